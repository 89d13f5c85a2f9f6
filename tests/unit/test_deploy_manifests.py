"""The deploy/ manifests: the DaemonSet against the Kubernetes JSON schema
(offline: the schemas ship in the kubernetes-validate package), what it must
and must not grant, and the systemd unit through ``systemd-analyze verify``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.needs import missing

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DAEMONSET = DEPLOY / "portscope-daemonset.yaml"
UNIT = DEPLOY / "portscope-export.service"
CAPABILITIES = {"SYS_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH"}


def _daemonset() -> dict:
    docs = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d]
    assert len(docs) == 1
    return docs[0]


def test_daemonset_validates_against_the_kubernetes_schema() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    # strict: unknown fields (a typo in a key) are errors too.
    kv.validate(_daemonset(), kv.latest_version(), strict=True)


def test_schema_validation_catches_a_bad_manifest() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    bad = _daemonset()
    bad["spec"]["template"]["spec"]["hostPID"] = "yes"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, kv.latest_version(), strict=True)
    typo = _daemonset()
    typo["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(typo, kv.latest_version(), strict=True)


def test_daemonset_grants_what_is_needed_and_no_more() -> None:
    pod = _daemonset()["spec"]["template"]["spec"]
    assert pod["hostPID"] is True and pod["hostNetwork"] is True
    (container,) = pod["containers"]
    ctx = container["securityContext"]
    assert ctx.get("privileged") is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert set(ctx["capabilities"]["add"]) == CAPABILITIES
    assert container["command"][:2] == ["portscope", "export"]
    assert "0.0.0.0:9977" in container["command"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/sys/kernel/btf"]["readOnly"] is True
    assert {"/sys/kernel/tracing", "/sys/fs/bpf"} <= set(mounts)
    paths = {v["name"]: v.get("hostPath", {}).get("path") for v in pod["volumes"]}
    for m in container["volumeMounts"]:
        assert m["name"] in paths
    # Every capability added is justified in a comment of the manifest.
    text = DAEMONSET.read_text()
    for cap in CAPABILITIES:
        assert f"# {cap}:" in text, f"no comment justifies {cap}"


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    if not shutil.which("systemd-analyze"):
        missing("needs systemd-analyze (package systemd)")
    # verify checks that ExecStart exists: point it at this checkout's portscope.
    exe = shutil.which("portscope") or str(Path(__file__).resolve().parents[2] / ".venv/bin/portscope")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/portscope", exe))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "export --listen" in UNIT.read_text()


def test_the_units_run_the_portscope_scripts_setup_installs() -> None:
    """Both units start /usr/local/bin/portscope, which scripts/setup links to
    the checkout's, with arguments portscope accepts."""
    import shlex

    for unit in sorted(DEPLOY.glob("*.service")):
        (line,) = [ln for ln in unit.read_text().splitlines() if ln.startswith("ExecStart=")]
        argv = shlex.split(line.removeprefix("ExecStart="))
        assert argv[0] == "/usr/local/bin/portscope", unit.name
        if not Path(argv[0]).exists():
            missing("/usr/local/bin/portscope is not there: run scripts/setup")
        out = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.startswith("usage: portscope"), out.stderr
