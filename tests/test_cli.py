"""The command line: `latentae <command>`, module entry points from an installed package (outside
the checkout), one-line user errors for every tool, and the CPU policy of the entry points."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from latentae import runtime
from latentae.cli import COMMANDS
from latentae.cli.bench import BENCHES

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMP_WAIT_POLICY")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    return env


def run(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run([PY, *args], capture_output=True, text=True, cwd=cwd or REPO, env=env or _env(), timeout=timeout)


def assert_one_line_error(r, *needles: str) -> None:
    """Exit status 2, exactly one line on stderr naming the problem, no traceback."""
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
    assert "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


# ----------------------------------------------------------------------------- the package, installed


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip install --target` of a copy of the package sources (the checkout stays untouched)."""
    tmp = tmp_path_factory.mktemp("installed")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "latentae", src / "latentae", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([PY, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-compile",
                        "--target", str(tmp / "site"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.rmtree(src)  # nothing but the installed copy is left to import
    return tmp / "site"


def test_installed_package_runs_train_as_a_module_under_torchrun_and_the_console_script(installed, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(PYTHONPATH=str(installed), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    elsewhere = tmp_path / "elsewhere"  # cwd: neither the checkout nor the installed folder
    elsewhere.mkdir()
    where = subprocess.run([PY, "-c", "import latentae, latentae.cli; print(latentae.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True)
    assert Path(where.stdout.strip()).is_relative_to(installed), where  # the checkout is not what runs
    dry = ["--dry-run", "--config", "tiny-f8c4", "data.path=/images", "train.batch_size=3"]  # a packaged config by name
    r = subprocess.run([PY, "-m", "latentae.train", *dry], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "global batch: 3 images" in r.stdout and "block_out_channels" in r.stdout
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m",
                        "latentae.train", *dry], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "global batch: 3 images" in r.stdout
    script = installed / "bin" / "latentae"  # the [project.scripts] console command
    r = subprocess.run([str(script), "--help"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and all(name in r.stdout for name in COMMANDS), r.stdout + r.stderr
    r = subprocess.run([str(script), "train", "--dry-run", "--config", "no-such-config"], cwd=elsewhere, env=env,
                       capture_output=True, text=True)
    assert_one_line_error(r, "no-such-config", "tiny-f8c4")  # the error lists the packaged configs


def test_packaged_configs_are_the_checkout_configs():
    from latentae.config import CONFIG_DIR, config_path, packaged_configs

    # One copy: configs/ in the checkout is a link to the package's folder, never a second set of files.
    assert (REPO / "configs").resolve() == CONFIG_DIR.resolve() == (REPO / "latentae" / "configs").resolve()
    assert {"tiny-f8c4", "tiny-f8c16", "sd-f8c4", "sd-f8c16"} <= set(packaged_configs())
    assert config_path("sd-f8c4") == config_path("sd-f8c4.yaml") == CONFIG_DIR / "sd-f8c4.yaml"


# ----------------------------------------------------------------------------- commands and errors


def test_every_command_has_help_and_the_package_imports_without_torch():
    code = ("import sys, latentae, latentae.cli, latentae.runtime, latentae.hub\n"
            "import latentae.cli.train, latentae.cli.demo, latentae.cli.export, latentae.cli.stats, latentae.cli.bench\n"
            "import latentae.cli.compare, latentae.cli.encode\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert callable(latentae.swap_vae) and 'torch' in sys.modules  # names load on first use\n")
    r = run(["-c", code])
    assert r.returncode == 0, r.stderr
    for name in COMMANDS:
        r = run(["-m", "latentae", name, "--help"])
        assert r.returncode == 0 and "usage" in r.stdout.lower(), (name, r.stderr[-2000:])
    assert run(["-m", "latentae", "--version"]).stdout.startswith("latentae ")
    for name in BENCHES:
        r = run(["-m", "latentae", "bench", name, "--help"])
        assert r.returncode == 0 and "usage" in r.stdout.lower(), (name, r.stderr[-2000:])


def test_compare_default_matches_the_library():
    from latentae.cli.compare import DEFAULT_ACTIVE_KL
    from latentae.health import DEFAULT_ACTIVE_KL as LIBRARY

    assert DEFAULT_ACTIVE_KL == LIBRARY


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("files")
    bad = tmp / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (tmp / "a_file").write_text("")
    return {"tmp": tmp, "broken": bad, "a_file": tmp / "a_file", "hf": tmp / "hf"}


ERROR_CASES = {
    # name: (argv after `python`, what the one line must name)
    "latentae: unknown command": (["-m", "latentae", "frobnicate"], ["frobnicate"]),
    "train: missing config": (["-m", "latentae", "train", "--config", "nope.yaml", "--output-dir", "o"], ["nope.yaml"]),
    "train: bad value": (["train/train.py", "--config", "tiny-f8c4", "--dry-run", "model.latent_channels=four"],
                         ["model.latent_channels", "four"]),
    "train: missing data": (["-m", "latentae.train", "--config", "tiny-f8c4", "--output-dir", "{tmp}/run",
                             "data.path={tmp}/no-photos"], ["{tmp}/no-photos"]),
    "train: bad option value": (["-m", "latentae", "train", "--config", "tiny-f8c4", "--threads", "0"], ["--threads"]),
    "encode: missing VAE": (["tools/encode.py", "--vae", "/missing/vae", "--data", "d", "--out", "o"], ["/missing/vae"]),
    "stats: missing latents": (["tools/latent_stats.py", "{tmp}/no-latents"], ["{tmp}/no-latents"]),
    "export: missing VAE": (["-m", "latentae", "export", "/missing/vae", "--out", "x", "--format", "diffusers"],
                            ["VAE not found: /missing/vae"]),
    "export: unreadable VAE": (["tools/export.py", "{broken}", "--out", "{tmp}/x", "--format", "diffusers"],
                               ["{broken}", "not a readable safetensors file"]),
    "export: hub id not cached, offline": (["-m", "latentae", "export", "someorg/some-vae", "--out", "{tmp}/x",
                                            "--format", "diffusers"], ["someorg/some-vae", "{hf}/hub", "download"]),
    "compare: missing VAE": (["-m", "latentae", "compare", "--vae", "a=/missing/vae", "--data", "{tmp}",
                              "--out", "{tmp}/cmp"], ["--vae a", "/missing/vae"]),
    "compare: missing data": (["tools/compare.py", "--vae", "a={tmp}", "--data", "{tmp}/no-images", "--out", "{tmp}/cmp"],
                              ["--data", "{tmp}/no-images"]),
    "compare: data is a file": (["-m", "latentae", "compare", "--vae", "a={tmp}", "--data", "{a_file}", "--out",
                                 "{tmp}/cmp"], ["--data", "{a_file}", "is a file"]),
    "compare: unreadable VAE": (["-m", "latentae", "compare", "--vae", "a={broken}", "--data", "{tmp}", "--out",
                                 "{tmp}/cmp", "--offline"], ["{broken}"]),
    "demo: missing config": (["tools/demo.py", "--config", "nope"], ["nope"]),
    "demo: unwritable output": (["-m", "latentae", "demo", "--output-dir", "{a_file}/demo"], ["{a_file}/demo"]),
    "bench: unknown benchmark": (["-m", "latentae", "bench", "frobnicate"], ["frobnicate"]),
    "bench busy: bad value": (["tools/bench_busy.py", "--variants", "bogus"], ["bogus"]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_user_errors_are_one_line_exit_2_no_traceback(case, files):
    argv, needles = ERROR_CASES[case]
    fill = lambda s: s.format(**{k: str(v) for k, v in files.items()})  # noqa: E731
    r = run([fill(a) for a in argv], env=_env(HF_HUB_OFFLINE="1", HF_HOME=str(files["hf"])))
    assert_one_line_error(r, *map(fill, needles))


# ----------------------------------------------------------------------------- busy machine


def test_thread_rule_leaves_a_core_per_data_worker():
    assert runtime.torch_threads(2, 1, 1) == 1  # the demo on 2 cores: the worker keeps the second core
    assert runtime.torch_threads(2, 1, 0) == 2
    assert runtime.torch_threads(16, 1, 4) == 12
    assert runtime.torch_threads(64, 8, 6) == 2  # 8 GPU processes, 6 workers each
    assert runtime.torch_threads(8, 8, 2) == 1  # never below one
    with pytest.raises(ValueError):
        runtime.torch_threads(0, 1, 1)
    assert runtime.local_processes({"LOCAL_WORLD_SIZE": "4"}) == 4 and runtime.local_processes({}) == 1


def test_cgroup_quota_caps_the_usable_cpus(tmp_path):
    assert runtime.cgroup_cpu_limit(tmp_path) is None  # no cpu.max: no limit
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert runtime.cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert runtime.cgroup_cpu_limit(tmp_path) == 1.5


def test_entry_points_set_passive_waiting_before_torch_and_the_thread_rule():
    """A real `latentae train` process: OMP_WAIT_POLICY=PASSIVE was in the environment before
    torch was imported, and torch runs the rule's thread count; a user's settings win."""
    probe = ("import os, sys, runpy\n"
             "import latentae.runtime as rt, latentae.training.loop as loop\n"
             "seen = {}\n"
             "def fake_train(cfg, out, resume=None):\n"
             "    import torch\n"
             "    seen.update(wait=os.environ.get('OMP_WAIT_POLICY'), threads=torch.get_num_threads())\n"
             "    raise SystemExit(0)\n"
             "loop.train = fake_train\n"
             "try:\n"
             "    runpy.run_module('latentae.train', run_name='__main__', alter_sys=True)\n"
             "except SystemExit:\n"
             "    pass\n"
             "print(seen['wait'], seen['threads'], rt.torch_threads(rt.usable_cpus(), 1, 1))\n")
    # (the probe imports latentae.training.loop first, i.e. torch; the assertion on *import order* is below)
    env = {k: v for k, v in _env().items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    args = ["-c", probe, "--config", "tiny-f8c4", "--output-dir", "o", "data.num_workers=1"]
    r = run(args, env=env)
    wait, threads, rule = r.stdout.split()
    assert r.returncode == 0 and wait == "PASSIVE" and threads == rule, r.stderr[-3000:]
    r = run(args, env={**env, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"})
    assert r.stdout.split()[:2] == ["ACTIVE", "2"], r.stderr[-3000:]
    # Import order: the entry module imports no torch before it has set the policy.
    order = ("import sys, builtins\n"
             "real = builtins.__import__\n"
             "def spy(name, *a, **k):\n"
             "    if name == 'torch' and 'torch' not in sys.modules:\n"
             "        import os; print('policy at torch import:', os.environ.get('OMP_WAIT_POLICY'), flush=True)\n"
             "    return real(name, *a, **k)\n"
             "builtins.__import__ = spy\n"
             "sys.argv = ['latentae', 'train', '--config', 'tiny-f8c4', '--dry-run', 'data.path=x']\n"
             "from latentae.cli import main\n"
             "raise SystemExit(main())\n")
    r = run(["-c", order], env=env)
    assert r.returncode == 0 and "policy at torch import: PASSIVE" in r.stdout, r.stdout + r.stderr[-3000:]
