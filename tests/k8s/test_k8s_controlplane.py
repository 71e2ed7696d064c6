"""The control-plane fixture itself: real components answer and survive a restart."""

from __future__ import annotations


def test_control_plane_restart_keeps_objects(control_plane):
    cp = control_plane
    cp.kubectl("create", "namespace", "cp-restart")
    try:
        before = cp.pids()
        cp.restart("etcd", "kube-apiserver")
        after = cp.pids()
        assert after["etcd"] != before["etcd"] and after["kube-apiserver"] != before["kube-apiserver"]
        # etcd kept its data: the namespace made before the restart is still there
        out = cp.kubectl("get", "namespace", "cp-restart", "-o", "jsonpath={.metadata.name}")
        assert out.stdout == "cp-restart"
    finally:
        cp.kubectl("delete", "namespace", "cp-restart", "--wait=false", check=False)
