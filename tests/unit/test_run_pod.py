"""scripts/run-pod: the DaemonSet's settings become podman's options, read
from the manifest, and a setting it cannot translate is an error, never
left out (the pod itself runs in tests/kernel/test_pod.py)."""

from __future__ import annotations

import copy
import sys

import pytest

from tests.scripts import load_script

run_pod = load_script("run-pod")


def test_every_setting_of_the_manifest_has_its_option() -> None:
    opts, image, command = run_pod.podman_args(run_pod.load())
    assert image == "portscope:0.1.0"
    assert command == ["export", "--listen", "0.0.0.0:9977"]
    assert '--entrypoint=["portscope"]' in opts
    for expected in ("--pid=host", "--network=host", "--cap-drop=all", "--read-only",
                     "--read-only-tmpfs=false", "--security-opt=no-new-privileges",
                     "--security-opt=seccomp=unconfined", "--user=0:0", "--memory=256m",
                     "--volume=/sys/kernel/btf:/sys/kernel/btf:ro,rprivate",
                     "--volume=/sys/fs/bpf:/sys/fs/bpf:rw,rslave", "--tmpfs=/tmp:rw,mode=1777"):
        assert expected in opts, expected
    caps = sorted(o.split("=")[1] for o in opts if o.startswith("--cap-add="))
    assert caps == sorted(f"CAP_{c}" for c in ("SYS_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH"))
    assert "--privileged" not in opts


def test_one_capability_can_be_left_out() -> None:
    opts, _, _ = run_pod.podman_args(run_pod.load(), without_cap="SYS_PTRACE")
    assert "--cap-add=CAP_SYS_PTRACE" not in opts and "--cap-add=CAP_SYS_ADMIN" in opts
    with pytest.raises(run_pod.Untranslatable):
        run_pod.podman_args(run_pod.load(), without_cap="NET_RAW")


@pytest.mark.parametrize("where, key, value", [
    (("spec", "template", "spec"), "hostIPC", True),
    (("spec", "template", "spec", "containers", 0), "env", [{"name": "X", "value": "1"}]),
    (("spec", "template", "spec", "containers", 0, "securityContext"), "procMount", "Unmasked"),
    (("spec", "template", "spec", "containers", 0, "securityContext", "seccompProfile"),
     "type", "Localhost"),
])
def test_a_setting_it_cannot_translate_is_an_error(where: tuple, key: str, value: object) -> None:
    manifest = copy.deepcopy(run_pod.load())
    node = manifest
    for step in where:
        node = node[step]
    node[key] = value
    with pytest.raises(run_pod.Untranslatable):
        run_pod.podman_args(manifest)


def test_print_shows_the_whole_command(capsys: pytest.CaptureFixture[str]) -> None:
    sys.argv = ["run-pod", "--print"]
    assert run_pod.main() == 0
    line = capsys.readouterr().out
    assert line.startswith("podman run --detach --runtime=runc ")
    assert "portscope:0.1.0 export --listen 0.0.0.0:9977" in line
