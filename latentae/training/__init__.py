"""Training a KL autoencoder (L1 + LPIPS + KL + PatchGAN under HF Accelerate).

One module per job; a newcomer reads them in this order:

    config.py      TrainConfig (the ``train:`` section) and the learning-rate arithmetic
                   (train.scale_lr); importable without torch or the trainer
    plan.py        config cross-checks and the --dry-run report (no data, no models)
    loop.py        Trainer / train(): start-up, the loop, logging  <- start here
    setup.py       set_up(): data, models, optimizers, scalers, EMA, DDP, compile, in the
                   one order that works, each step with its reason
    models.py      the VAE (fresh or train.init_from), decoder-only freezing, the discriminator
    step.py        one optimizer step (micro-batches, loss scaling, clipping, EMA); no host sync
    forward.py     TrainingForward (the module DDP wraps: every encode/decode of a micro-batch)
                   and draw_plan (the diffusability regularisers' seeded per-step choices)
    control.py     the step's one collective: logs, non-finite check, stop/checkpoint requests;
                   stop signals (preemption) and wall-clock checkpoints
    ranks.py       what ranks tell each other outside the step: failure-aware barriers, rank 0's
                   answers at start-up, failure reports, a watcher thread (heartbeats)
    state.py       what a checkpoint holds, writing it, reading it back, resolving --resume
    evaluate.py    validation (fp32, no autocast) and the final export
    policy.py      device / precision decisions as plain functions (fused Adam, cudnn, compile)
    host_syncs.py  a counter of device-to-host waits, for tests and tools/bench_train.py
    errors.py      the exceptions a run stops with

This file imports nothing, so ``latentae.recipe`` can import ``training.config``
without pulling in the trainer (the trainer imports the recipe, never the reverse).
"""
