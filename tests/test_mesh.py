"""The chain plan (padding rule), device selection and host device count."""

import jax
import pytest

import chainmesh as cm
from chainmesh.mesh import chain_mesh, plan_chains, resolve_devices


@pytest.mark.parametrize(
    ("chains", "devices", "used", "per", "pad"),
    [
        (10, 4, 4, 3, 2),
        (2, 8, 2, 1, 0),
        (8, 8, 8, 1, 0),
        (1, 8, 1, 1, 0),
        (16, 8, 8, 2, 0),
        (9, 8, 5, 2, 1),
        (7, 3, 3, 3, 2),
    ],
)
def test_padding_rule(chains, devices, used, per, pad):
    plan = plan_chains(chains, jax.devices()[:devices])
    assert (plan.num_devices, plan.chains_per_device, plan.num_padding) == (
        used,
        per,
        pad,
    )
    assert plan.total_chains == chains + pad
    assert plan.num_padding < plan.chains_per_device  # never a whole idle device


def test_mesh_has_chain_axis():
    plan = plan_chains(10, jax.devices()[:4])
    mesh = chain_mesh(plan)
    assert mesh.axis_names == (cm.CHAIN,)
    assert mesh.shape[cm.CHAIN] == 4


def test_resolve_devices():
    assert resolve_devices(None) == jax.devices()
    assert resolve_devices(3) == jax.devices()[:3]
    picked = [jax.devices()[5], jax.devices()[2]]
    assert resolve_devices(picked) == picked


@pytest.mark.parametrize(
    ("devices", "error", "match"),
    [
        (9, ValueError, "8 device"),
        (0, ValueError, "devices=0"),
        ([], ValueError, "empty"),
        ("cpu", TypeError, "devices must be"),
        ([0, 1], TypeError, "jax.Device"),
    ],
)
def test_bad_devices(devices, error, match):
    with pytest.raises(error, match=match):
        resolve_devices(devices)


def test_set_host_device_count_after_start():
    cm.set_host_device_count(8)  # same count as running: accepted
    with pytest.raises(RuntimeError, match="before any JAX operation"):
        cm.set_host_device_count(4)
    with pytest.raises(ValueError, match="positive int"):
        cm.set_host_device_count(0)
