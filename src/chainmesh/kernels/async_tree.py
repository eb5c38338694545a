"""One NUTS trajectory as a state machine that adds one leaf per call.

NumPyro's ``build_tree`` nests three loops: doublings of the tree, the leaves
of the subtree a doubling builds (``_iterative_build_subtree``), and the U-turn
checks of a leaf against its checkpoints. Here the first two become state:
``Tree`` is the trajectory built so far and ``Subtree`` the doubling in
progress; ``advance`` takes one leapfrog step, adds the leaf to the subtree
and, when the subtree ends, combines it into the tree. The U-turn checks of a
leaf run at once, masked to NumPyro's checkpoint range. Keys are split where
NumPyro splits them, so a lane draws exactly the trajectory ``build_tree``
draws. Every function here acts on one lane; the caller vmaps them.

Vectors are flat (``ravel_pytree`` of the sites); the inverse mass matrix is
the single block chainmesh adapts (diagonal: 1-D, dense: 2-D).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import random
from jax.scipy.special import expit

MAX_DELTA_ENERGY = 1000.0
"""NumPyro's divergence threshold on the energy error of a leaf."""


class Tree(NamedTuple):
    """The trajectory of a transition so far (NumPyro's ``TreeInfo``).

    The proposal is the multinomial sample among its leaves; ``r_sum`` the sum
    of their momenta, for the U-turn criterion.
    """

    z_left: jax.Array
    r_left: jax.Array
    g_left: jax.Array
    z_right: jax.Array
    r_right: jax.Array
    g_right: jax.Array
    z_prop: jax.Array
    g_prop: jax.Array
    pe_prop: jax.Array
    energy_prop: jax.Array
    depth: jax.Array
    weight: jax.Array
    r_sum: jax.Array
    turning: jax.Array
    diverging: jax.Array
    sum_accept: jax.Array
    n_prop: jax.Array


class Subtree(NamedTuple):
    """The doubling in progress: leaves added on one side of the tree.

    ``z, r, g`` is its outer leaf, where the next leapfrog step starts (at
    the start of a doubling: the tree's leaf on that side). Only its outer end
    is kept: the inner end touches the tree and is never needed again.
    ``r_ckpts``/``r_sum_ckpts`` are the U-turn checkpoints of NumPyro's
    iterative builder; ``key`` is split once per leaf, ``transition_key``
    decides whether the tree's proposal moves into this subtree.
    """

    z: jax.Array
    r: jax.Array
    g: jax.Array
    z_prop: jax.Array
    g_prop: jax.Array
    pe_prop: jax.Array
    energy_prop: jax.Array
    weight: jax.Array
    r_sum: jax.Array
    turning: jax.Array
    diverging: jax.Array
    sum_accept: jax.Array
    n_prop: jax.Array
    r_ckpts: jax.Array
    r_sum_ckpts: jax.Array
    key: jax.Array
    transition_key: jax.Array
    going_right: jax.Array


def select(pred: jax.Array, on_true, on_false):
    """``jnp.where`` over two pytrees of the same structure (scalar ``pred``)."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def apply_inverse_mass(imm: jax.Array, r: jax.Array) -> jax.Array:
    """Velocity ``M^-1 r`` (``imm`` diagonal as a vector, or dense)."""
    return jnp.multiply(imm, r) if imm.ndim == 1 else jnp.matmul(imm, r)


def kinetic_energy(imm: jax.Array, r: jax.Array) -> jax.Array:
    """NumPyro's ``euclidean_kinetic_energy`` on a flat momentum."""
    return 0.5 * jnp.dot(apply_inverse_mass(imm, r), r)


def _is_turning(imm, r_left, r_right, r_sum) -> jax.Array:
    """The generalized U-turn criterion (NumPyro's ``_is_turning``)."""
    v_left = apply_inverse_mass(imm, r_left)
    v_right = apply_inverse_mass(imm, r_right)
    r_sum = r_sum - (r_left + r_right) / 2
    return (jnp.dot(v_left, r_sum) <= 0) | (jnp.dot(v_right, r_sum) <= 0)


def _ckpt_range(n: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Checkpoints leaf ``n`` of a subtree is checked against (inclusive)."""
    idx_max = jnp.bitwise_count(n >> 1).astype(jnp.int32)
    num_subtrees = jnp.bitwise_count((~n & (n + 1)) - 1).astype(jnp.int32)
    return idx_max - num_subtrees + 1, idx_max


def new_tree(z, r, g, pe, energy) -> Tree:
    """The trajectory of one point: where a transition starts (``build_tree``)."""
    zero = jnp.zeros_like(pe)
    return Tree(
        z, r, g, z, r, g, z, g, pe, energy,
        depth=jnp.zeros((), jnp.int32),
        weight=zero,
        r_sum=r,
        turning=jnp.array(False),
        diverging=jnp.array(False),
        sum_accept=zero,
        n_prop=jnp.zeros((), jnp.result_type(int)),
    )  # fmt: skip


def start_doubling(tree: Tree, key: jax.Array, sub: Subtree) -> tuple:
    """Draw the direction of the next doubling: ``(subtree, key)``.

    The splits are those of ``build_tree``'s loop body and ``_double_tree``.
    The checkpoints of the previous subtree ``sub`` are kept: a leaf reads
    only checkpoints written earlier in its own subtree.
    """
    key, direction_key, doubling_key = random.split(key, 3)
    going_right = random.bernoulli(direction_key)
    sub_key, transition_key = random.split(doubling_key)
    z, r, g = select(
        going_right,
        (tree.z_right, tree.r_right, tree.g_right),
        (tree.z_left, tree.r_left, tree.g_left),
    )
    sub = Subtree(
        z, r, g, tree.z_prop, tree.g_prop, tree.pe_prop, tree.energy_prop,
        weight=tree.weight,
        r_sum=tree.r_sum,
        turning=jnp.array(False),
        diverging=jnp.array(False),
        sum_accept=tree.sum_accept,
        n_prop=jnp.zeros_like(tree.n_prop),
        r_ckpts=sub.r_ckpts,
        r_sum_ckpts=sub.r_sum_ckpts,
        key=sub_key,
        transition_key=transition_key,
        going_right=going_right,
    )  # fmt: skip
    return sub, key


def _add_leaf(
    sub: Subtree,
    value_and_grad: Callable,
    imm: jax.Array,
    step_size: jax.Array,
    energy0: jax.Array,
) -> tuple[Subtree, tuple, jax.Array, jax.Array]:
    """One leapfrog step from the subtree's outer leaf, the leaf added to it.

    ``_build_basetree``, then the body of ``_iterative_build_subtree``: the
    checkpoint update, the U-turn checks and the uniform multinomial combine,
    but for its draw: returns ``(subtree, leaf proposal, key, probability)``,
    the proposal moving to the leaf if the draw says so.
    """
    eps = jnp.where(sub.going_right, step_size, -step_size)
    r = sub.r - 0.5 * eps * sub.g
    z = sub.z + eps * apply_inverse_mass(imm, r)
    pe, g = value_and_grad(z)
    r = r - 0.5 * eps * g
    energy = pe + kinetic_energy(imm, r)
    delta = energy - energy0
    delta = jnp.where(jnp.isnan(delta), jnp.inf, delta)
    weight = -delta
    accept = jnp.clip(jnp.exp(-delta), None, 1.0)

    key, transition_key = random.split(sub.key)
    first = sub.n_prop == 0
    prob = jnp.where(first, 1.0, expit(weight - sub.weight))
    r_sum = jnp.where(first, r, sub.r_sum + r)

    leaf_idx = sub.n_prop
    idx_min, idx_max = _ckpt_range(leaf_idx)
    idx = jnp.arange(sub.r_ckpts.shape[0])
    write = ((leaf_idx % 2 == 0) & (idx == idx_max))[:, None]
    r_ckpts = jnp.where(write, r, sub.r_ckpts)
    r_sum_ckpts = jnp.where(write, r_sum, sub.r_sum_ckpts)
    subtree_r_sum = r_sum - r_sum_ckpts + r_ckpts
    turns = jax.vmap(_is_turning, (None, 0, None, 0))(imm, r_ckpts, r, subtree_r_sum)
    turning = jnp.any(turns & (idx >= idx_min) & (idx <= idx_max))

    sub = Subtree(
        z, r, g, sub.z_prop, sub.g_prop, sub.pe_prop, sub.energy_prop,
        weight=jnp.where(first, weight, jnp.logaddexp(sub.weight, weight)),
        r_sum=r_sum,
        turning=turning,
        diverging=delta > MAX_DELTA_ENERGY,
        sum_accept=jnp.where(first, accept, sub.sum_accept + accept),
        n_prop=sub.n_prop + 1,
        r_ckpts=r_ckpts,
        r_sum_ckpts=r_sum_ckpts,
        key=key,
        transition_key=sub.transition_key,
        going_right=sub.going_right,
    )  # fmt: skip
    return sub, (z, g, pe, energy), transition_key, prob


def _combine(tree: Tree, sub: Subtree, imm: jax.Array, take: jax.Array) -> Tree:
    """A finished subtree joined to the tree (``_combine_tree``, biased);
    ``take``: the draw that moves the proposal into the subtree."""
    right = sub.going_right
    leaf = (sub.z, sub.r, sub.g)
    z_left, r_left, g_left = select(
        right, (tree.z_left, tree.r_left, tree.g_left), leaf
    )
    z_right, r_right, g_right = select(
        right, leaf, (tree.z_right, tree.r_right, tree.g_right)
    )
    r_sum = tree.r_sum + sub.r_sum
    turning = sub.turning | _is_turning(imm, r_left, r_right, r_sum)
    z_prop, g_prop, pe_prop, energy_prop = select(
        take,
        (sub.z_prop, sub.g_prop, sub.pe_prop, sub.energy_prop),
        (tree.z_prop, tree.g_prop, tree.pe_prop, tree.energy_prop),
    )
    return Tree(
        z_left, r_left, g_left, z_right, r_right, g_right,
        z_prop, g_prop, pe_prop, energy_prop,
        depth=tree.depth + 1,
        weight=jnp.logaddexp(tree.weight, sub.weight),
        r_sum=r_sum,
        turning=turning,
        diverging=sub.diverging,
        sum_accept=tree.sum_accept + sub.sum_accept,
        n_prop=tree.n_prop + sub.n_prop,
    )  # fmt: skip


def advance(
    tree: Tree,
    sub: Subtree,
    value_and_grad: Callable,
    imm: jax.Array,
    step_size: jax.Array,
    energy0: jax.Array,
    max_depth: int,
) -> tuple[Tree, Subtree, jax.Array, jax.Array]:
    """Add one leaf: ``(tree with the subtree in, subtree, subtree done, tree
    done)``.

    The first is the tree once the subtree is done (the caller keeps ``tree``
    otherwise, starts the next doubling, or when the tree is done too
    finishes the transition). The two multinomial draws (leaf into subtree,
    subtree into tree) share one call: their probabilities are independent.
    """
    sub, leaf, leaf_key, leaf_prob = _add_leaf(
        sub, value_and_grad, imm, step_size, energy0
    )
    prob = jnp.clip(jnp.exp(sub.weight - tree.weight), None, 1.0)
    prob = jnp.where(sub.turning | sub.diverging, 0.0, prob)
    keys = jnp.stack([leaf_key, sub.transition_key])
    to_leaf, to_sub = jax.vmap(random.bernoulli)(keys, jnp.stack([leaf_prob, prob]))
    proposal = (sub.z_prop, sub.g_prop, sub.pe_prop, sub.energy_prop)
    z_prop, g_prop, pe_prop, energy_prop = select(to_leaf, leaf, proposal)
    sub = sub._replace(
        z_prop=z_prop, g_prop=g_prop, pe_prop=pe_prop, energy_prop=energy_prop
    )
    full = sub.n_prop >= (1 << tree.depth).astype(sub.n_prop.dtype)
    sub_done = full | sub.turning | sub.diverging
    combined = _combine(tree, sub, imm, to_sub)
    grows = (combined.depth < max_depth) & ~combined.turning & ~combined.diverging
    return combined, sub, sub_done, sub_done & ~grows
