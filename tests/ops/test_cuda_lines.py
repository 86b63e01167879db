"""The onnxruntime-gpu line for each card: the set-up script, the doctor and the worker agree.

The real scripts/setup.sh and `ident doctor` run with a stand-in nvidia-smi on
PATH (tests/ops/nvidia_smi_standin.py) answering as a GeForce MX230 (Pascal
6.1, 2 GiB), an RTX 4060 Laptop (Ada 8.9), a GTX 970M (Maxwell 5.2) and a
GTX 950M (Maxwell 5.0). What each wheel carries comes from
models/cuda_builds.json, which scripts/cuda_builds.py read from the wheels
with cuobjdump.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from models import cuda_builds
from models.cuda import explain_cpu_fallback
from models.runtime import plan_device
from tasks.errors import DeviceUnavailable
from tests.gpu_standin import cuda_host_facts
from tests.ops import nvidia_smi_standin

REPO = Path(__file__).resolve().parents[2]
MX230, RTX4060, GTX970M, GTX950M = (6, 1), (8, 9), (5, 2), (5, 0)


def dry_run(tmp_path: Path, card: str | None, *args: str) -> dict:
    """scripts/setup.sh --dry-run --json, as a user runs it, with ``card`` answering nvidia-smi."""
    if card is None:  # a PATH on which no nvidia-smi can be found
        env = {**os.environ, "PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                                     if not (Path(p) / "nvidia-smi").exists())}
    else:
        env = nvidia_smi_standin.environment(tmp_path / "bin", card)
    done = subprocess.run(["bash", "scripts/setup.sh", "--dry-run", "--json", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    choice = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(choice) >= {"line", "packages", "command", "reason"}
    return choice


def pin(packages: list[str], name: str) -> str:
    found = [p for p in packages if re.match(rf"{re.escape(name)}(\[[^\]]*\])?==", p)]
    assert found, f"{name} is not pinned in {packages}"
    return found[0].split("==", 1)[1]


def test_the_mx230_gets_cuda_12_with_a_cudnn_that_still_has_pascal(tmp_path):
    choice = dry_run(tmp_path, "mx230")
    assert choice["line"] == "cuda12"
    assert "onnxruntime-gpu[cuda,cudnn]==1.26.0" in choice["packages"]
    cudnn = pin(choice["packages"], "nvidia-cudnn-cu12")
    assert tuple(int(x) for x in cudnn.split(".")[:2]) < (9, 11)
    assert "MX230" in choice["reason"] and "sm_61" in choice["reason"] and "6.1" in choice["reason"]
    assert choice["command"].startswith(".venv/bin/python -m pip install -c constraints-cuda12.txt -e '.[dev]' ")
    assert all(package in choice["command"] for package in choice["packages"])


def test_the_rtx_4060_gets_cuda_13_and_nothing_says_cuda_12(tmp_path):
    choice = dry_run(tmp_path, "rtx4060")
    assert choice["line"] == "cuda13"
    assert pin(choice["packages"], "onnxruntime-gpu") == cuda_builds.LINES["cuda13"].ort_version
    assert "sm_89" in choice["reason"] and "cuDNN 9.11" not in choice["reason"]
    assert "--cuda 12" not in json.dumps(choice) and "cu12" not in json.dumps(choice)


def test_the_gtx_970m_gets_the_newest_build_whose_wheel_carries_sm_52(tmp_path):
    choice = dry_run(tmp_path, "gtx970m")
    assert choice["line"] == "cuda12-sm52"
    version = pin(choice["packages"], "onnxruntime-gpu")
    carries = [b for b in cuda_builds.load_builds().values() if b.runs_on(GTX970M)]
    newest = max(carries, key=lambda b: tuple(int(x) for x in b.version.split(".")))
    assert version == newest.version and newest.cuda_major == 12
    assert "sm_52" in newest.sass or "sm_52" in newest.ptx
    assert tuple(int(x) for x in pin(choice["packages"], "nvidia-cudnn-cu12").split(".")[:2]) < (9, 11)


def test_the_gtx_950m_gets_the_cpu_with_the_reason(tmp_path):
    choice = dry_run(tmp_path, "gtx950m")
    assert choice["line"] == "cpu" and choice["packages"] == [f"onnxruntime-gpu=={cuda_builds.LINES['cpu'].ort_version}"]
    assert "sm_50" in choice["reason"] and "no published onnxruntime-gpu wheel carries code for it" in choice["reason"]
    assert "1.26" not in choice["reason"]


def test_no_nvidia_smi_means_the_cpu(tmp_path):
    choice = dry_run(tmp_path, None)
    assert choice["line"] == "cpu" and "no nvidia-smi" in choice["reason"]


def test_the_line_can_be_forced(tmp_path):
    forced = dry_run(tmp_path, "mx230", "--cuda", "13")
    assert forced["line"] == "cuda13" and "has no code for it" in forced["reason"]
    assert dry_run(tmp_path, "rtx4060", "--cuda", "none")["line"] == "cpu"
    assert dry_run(tmp_path, "rtx4060", "--cuda", "12")["line"] == "cuda12"


def test_the_driver_decides_too():
    # An RTX 3060 on driver 535 (CUDA 12.2): the CUDA 12 line carries sm_86 and runs there.
    desktop = cuda_builds.choose_for((8, 6), 535)
    assert desktop.line == "cuda12" and "older than the 580+" in desktop.reason
    # An MX230 on driver 470 (CUDA 11.4): nothing with Pascal code runs on it.
    old = cuda_builds.choose_for(MX230, 470)
    assert old.line == "cpu" and "upgrade the NVIDIA driver" in old.reason


def test_the_cuda12_constraints_pin_a_cuda_12_wheel_that_carries_sm_61():
    line = cuda_builds.LINES["cuda12"]
    build = line.build()
    assert build is not None, f"onnxruntime-gpu {line.ort_version} is not in models/cuda_builds.json"
    assert build.cuda_major == 12 and build.runs_on(MX230)
    assert "sm_60" in build.sass, "cuobjdump listed SASS for sm_60, which runs on 6.1"
    assert tuple(int(x) for x in line.pins()["nvidia-cudnn-cu12"].split(".")[:2]) < (9, 11)


def test_the_table_was_read_from_the_wheels_and_says_how():
    table = json.loads(cuda_builds.TABLE.read_text())
    assert table["generated_by"].startswith("python scripts/cuda_builds.py")
    assert "cuobjdump" in table["cuobjdump"]
    builds = cuda_builds.load_builds()
    assert not builds["1.31.1"].runs_on(MX230) and builds["1.31.1"].runs_on(RTX4060)
    assert not any(b.runs_on(GTX950M) for b in builds.values()), "no published wheel has code for 5.0"
    for row in table["builds"]:
        assert re.fullmatch(r"[0-9a-f]{64}", row["wheel_sha256"]) and row["wheel"].endswith(".whl")


def test_every_line_names_files_that_exist():
    for line in cuda_builds.LINES.values():
        assert (REPO / line.constraints).is_file()
        assert line.build() is not None, f"{line.name}'s onnxruntime-gpu {line.ort_version} is not in the table"


def test_the_worker_refuses_or_falls_back_on_a_card_its_wheel_has_no_code_for():
    facts = cuda_host_facts(MX230, ort_version="1.31.1")
    reason = explain_cpu_fallback(facts, 0)
    assert "has no kernels for sm_61" in reason and "scripts/setup.sh --cuda 12" in reason
    assert "nvidia-cudnn-cu12==9.10" in reason
    assert plan_device("auto", 0, facts).cpu_reason == reason
    with pytest.raises(DeviceUnavailable, match="sm_61"):
        plan_device("cuda", 0, facts)
    assert explain_cpu_fallback(cuda_host_facts(RTX4060, ort_version="1.31.1"), 0) is None


def doctor(tmp_path: Path, card: str, *args: str) -> dict:
    env = nvidia_smi_standin.environment(tmp_path / "bin", card)
    env = {k: v for k, v in env.items() if not k.startswith("IDENT_")}
    done = subprocess.run([sys.executable, "-m", "ident.cli", "doctor", "--json", "--no-models", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


def test_the_doctor_on_an_mx230_names_sm_61_and_gives_the_set_up_command_with_the_cudnn_pin(tmp_path):
    report = doctor(tmp_path, "mx230")
    checks = {c["name"]: c for c in report["checks"]}
    versions = checks["CUDA versions (build / driver / GPU)"]
    assert versions["status"] == "fail"
    assert "sm_61" in versions["detail"] and "MX230" in versions["detail"]
    assert "scripts/setup.sh --cuda 12" in versions["fix"]
    assert "nvidia-cudnn-cu12==9.10" in versions["fix"] and "onnxruntime-gpu[cuda,cudnn]==1.26.0" in versions["fix"]
    memory = checks["GPU memory"]
    assert memory["status"] in ("ok", "warn") and "2048 MiB" in memory["detail"]
    assert "silero_vad" in memory["detail"], "named among the models kept on the CPU"


def test_the_doctor_weighs_more_pool_processes_against_the_card(tmp_path):
    memory = {c["name"]: c for c in doctor(tmp_path, "mx230", "--vision-concurrency", "2",
                                           "--audio-concurrency", "2")["checks"]}["GPU memory"]
    assert memory["status"] == "fail" and "IDENT_CPU_MODELS" in memory["fix"]


def test_the_doctor_on_an_rtx_4060_never_advises_cuda_12(tmp_path):
    report = doctor(tmp_path, "rtx4060")
    versions = {c["name"]: c for c in report["checks"]}["CUDA versions (build / driver / GPU)"]
    assert versions["status"] == "ok" and "sm_89" in versions["detail"]
    assert "--cuda 12" not in json.dumps(report) and "<1.27" not in json.dumps(report)


def test_the_doctor_never_sends_a_maxwell_5_0_owner_to_1_26(tmp_path):
    report = doctor(tmp_path, "gtx950m")
    versions = {c["name"]: c for c in report["checks"]}["CUDA versions (build / driver / GPU)"]
    assert versions["status"] == "fail" and "sm_50" in versions["detail"]
    assert "IDENT_DEVICE=cpu" in versions["fix"]
    assert "1.26" not in json.dumps(report) and "--cuda 12" not in json.dumps(report)
    maxwell = {c["name"]: c for c in doctor(tmp_path, "gtx970m")["checks"]}["CUDA versions (build / driver / GPU)"]
    assert "scripts/setup.sh --cuda 12" in maxwell["fix"] and "onnxruntime-gpu==1.20.2" in maxwell["fix"]


def test_compose_gpu_defaults_fit_a_2_gib_card():
    from ident.doctor import gpu_memory_estimate
    from tasks.settings import Settings
    from tests.ops.test_compose import REPO_ROOT, raw

    services = raw(REPO_ROOT / "compose.gpu.yml")["services"]
    processes = {kind: int(re.search(r"-c \$\{\w+:-(\d+)\}", services[f"{kind}-worker"]["command"]).group(1))
                 for kind in ("vision", "audio")}
    cpu_models = re.search(r"\$\{IDENT_CPU_MODELS-(\w*)\}", services["vision-worker"]["environment"]["IDENT_CPU_MODELS"])
    settings = Settings.from_env({"IDENT_CPU_MODELS": cpu_models.group(1)})
    assert gpu_memory_estimate(settings, processes)["total_mib"] <= 2048 * 0.9
