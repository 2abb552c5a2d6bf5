"""Attach the fast rules (and Opacus' grad samplers for the rest) to an unmodified module."""

from __future__ import annotations

import functools
import math
import types
from collections import defaultdict
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from opacus.grad_sample import GradSampleHooks
from opacus.layers import DPGRU, DPLSTM, DPRNN
from torch import Tensor, nn

from lightning_privacy.dp import coverage
from lightning_privacy.dp.fast.records import LayerState, Prepared, Recording, Workspace
from lightning_privacy.dp.fast.rules import FAST_RULES
from lightning_privacy.dp.providers import ProvidedGrads, RecordingProvider

_RECURRENT = (DPRNN, DPLSTM, DPGRU)


def _own_trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def _plan(
    module: nn.Module, batch_first: bool, provided: Collection[int] = ()
) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """``(fast, fallback)`` layers by qualified name, in ``named_modules`` order.

    Walks like Opacus' ``GradSampleHooks``: a module with trainable parameters of its own (other
    than ``provided``: the ids of parameters a recording provider covers) is a layer; one without
    a grad sampler (fast or Opacus) is handed whole to functorch, so its
    children are not visited. A layer that shares a trainable parameter with another layer (tied
    weights) falls back too: Opacus sums its per-sample gradients over the layers before the norm.
    """
    fast: dict[str, nn.Module] = {}
    fallback: dict[str, nn.Module] = {}
    claims: dict[int, int] = defaultdict(int)

    def walk(m: nn.Module, name: str) -> None:
        own = [p for p in _own_trainable(m) if id(p) not in provided]
        if own:
            rule = FAST_RULES.get(type(m))
            if rule is not None and rule.eligible(m, batch_first):
                fast[name] = m
            else:
                fallback[name] = m
                if type(m) not in GradSampleHooks.GRAD_SAMPLERS and not isinstance(m, _RECURRENT):
                    for p in m.parameters():
                        if p.requires_grad:
                            claims[id(p)] += 1
                    return
            for p in own:
                claims[id(p)] += 1
        for child_name, child in m.named_children():
            walk(child, f"{name}.{child_name}" if name else child_name)

    walk(module, "")
    for name, m in list(fast.items()):
        if any(claims[id(p)] > 1 for p in _own_trainable(m)):
            fallback[name] = fast.pop(name)
    order = {n: i for i, (n, _) in enumerate(module.named_modules(remove_duplicate=False))}
    return (dict(sorted(fast.items(), key=lambda kv: order[kv[0]])),
            dict(sorted(fallback.items(), key=lambda kv: order[kv[0]])))  # fmt: skip


def fast_rule_coverage(module: nn.Module, provided: Collection[int] = ()) -> tuple[list[str], list[str]]:
    """Which trainable layers of ``module`` the fast mode covers, and which fall back to Opacus.

    A layer is a module with trainable parameters of its own. Frozen layers are in neither list,
    nor are modules whose parameters are all ``provided`` (ids of the parameters a recording
    per-sample provider covers, :mod:`lightning_privacy.dp.providers`).
    A layer with neither a fast rule nor an Opacus grad sampler is listed as a fallback (Opacus
    computes its per-sample gradients with functorch, its children included); whether Opacus can
    handle it at all is the module validator's question, so nothing is raised here.

    Args:
        module: the model, unmodified.

    Returns:
        ``(fast, fallback)``: qualified layer names as in ``module.named_modules()`` (``""`` is the
        model itself).

    Example::

        fast, fallback = fast_rule_coverage(model)
        mode = "fast" if not fallback else "hooks"
    """
    fast, fallback = _plan(module, batch_first=True, provided=provided)
    return list(fast), list(fallback)


class _FallbackHooks(GradSampleHooks):
    """Opacus' ``GradSampleHooks`` on a given list of layers only (the ones without a fast rule)."""

    def __init__(self, root: nn.Module, layers: list[nn.Module], **kwargs: Any) -> None:
        self._layers = layers
        super().__init__(root, strict=False, **kwargs)

    def iterate_submodules(self, module: nn.Module) -> Iterator[nn.Module]:
        yield from self._layers


def _fast_forward(state: LayerState, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The forward of a fast layer while attached: records in training under grad, else the class's.

    Bound to the module as an instance attribute; ``state.module is module`` fails on a deep copy
    of the attached model, which then runs the plain forward.
    """
    recording = state.recording
    if (
        not recording.attached
        or state.module is not module
        or not module.training
        or not torch.is_grad_enabled()
        or not any(p is not None and p.requires_grad for p in module._parameters.values())
        or len(args) + len(kwargs) != 1
    ):
        return type(module).forward(module, *args, **kwargs)
    pass_id = recording.next_forward()
    # Every fast layer's forward takes one tensor, `input`; any other call raises in the class's forward.
    x = args[0] if args else kwargs.get("input")
    if x is None:
        return type(module).forward(module, *args, **kwargs)
    return state.rule.forward(state, module, pass_id, x)


@dataclass(frozen=True)
class _ParamsPlan:
    """The fast layers (with the parameters of each that are clipped) and the other parameters of
    one optimizer's parameter list."""

    layers: list[tuple[LayerState, list[Tensor]]]
    fallback_params: list[Tensor]
    device: torch.device
    #: The recording providers that own some of the parameters.
    providers: list[RecordingProvider]


class FastGradSampleHooks:
    """Per-sample clipping by book-keeping, attached to an unmodified module.

    For each trainable Linear, Conv1d/Conv2d, Embedding, LayerNorm and GroupNorm layer, the layer
    runs (while attached, in training, under grad) through a custom autograd function that keeps
    its input and, in backward, its output gradient. :func:`fast_clipping` then computes each
    sample's gradient norm from these (the ghost-norm identities) and the clipped sum as one
    contraction per layer: no per-sample gradient is materialised for these layers and there is
    no second backward. Autograd's own (unclipped) gradient of a parameter is skipped once a fast
    optimizer owns the parameter, unless the parameter carries a tensor hook of the user's.

    Other trainable layers get Opacus' per-layer grad samplers (``p.grad_sample``), in the same
    backward pass; the clipping step combines both into one flat per-sample norm. Parameters a
    recording provider covers (:class:`~lightning_privacy.dp.providers.RecordingProvider`: Keras
    layers) enter that norm through the provider's per-sample norms and weighted sums.

    Nothing wraps the module: ``state_dict`` keys, ``requires_grad`` flags and the user's hooks
    are untouched. While attached, each fast layer has an instance attribute ``forward`` (the
    class's forward is used in eval mode, under ``no_grad`` and on a deep copy); :meth:`cleanup`
    removes it with everything else.

    Args:
        module: the model.
        loss_reduction: ``"mean"`` or ``"sum"``, how the loss reduces over the batch (as in
            Opacus: with ``"mean"`` the output gradients are multiplied by the batch size).
        batch_first: whether dim 0 of the layers' inputs is the batch (else dim 1, as in Opacus;
            convolutions and GroupNorm then fall back).
        providers: recording providers attached to the module; they are switched to keeping
            records (:meth:`~lightning_privacy.dp.providers.RecordingProvider.keep_records`).

    Raises:
        ValueError: for another ``loss_reduction``, or if Opacus hooks are already attached.

    Example::

        hooks = FastGradSampleHooks(model)
        optimizer = fast_clipping(DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                              noise_multiplier=1.0, max_grad_norm=1.0,
                                              expected_batch_size=64), hooks)
        ...  # train as usual
        hooks.cleanup()
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        loss_reduction: str = "mean",
        batch_first: bool = True,
        providers: Sequence[RecordingProvider] = (),
    ) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}.")
        self._module = module
        self.loss_reduction = loss_reduction
        #: ``id(param) -> name`` for the errors and warnings of the clipping step.
        self.param_names: dict[int, str] = {id(p): n for n, p in module.named_parameters()}
        self._untrained_warned: set[str] = set()
        self.batch_first = batch_first
        self._providers = list(providers)
        #: ``id(param) -> provider`` for the parameters a recording provider covers.
        self._provided: dict[int, RecordingProvider] = {id(p): prov for prov in self._providers for p in prov.params}
        for provider in self._providers:
            provider.keep_records()
        #: Provided parameters whose autograd gradient the provider skips (it then holds only uses
        #: outside the provider's layers).
        self._provider_skips: set[int] = set()
        fast, fallback = _plan(module, batch_first, self._provided)
        self.fast_layers: list[str] = list(fast)
        self.fallback_layers: list[str] = list(fallback)
        self._recording = Recording(batch_first=batch_first)
        self._fallback: _FallbackHooks | None = None
        if fallback:
            self._fallback = _FallbackHooks(
                module, list(fallback.values()), batch_first=batch_first, loss_reduction=loss_reduction
            )
        self._workspace = Workspace()
        self._plan_cache: tuple[tuple[int, ...], _ParamsPlan] | None = None
        self._layers: list[LayerState] = []
        self._param_layer: dict[int, LayerState] = {}
        for name, m in fast.items():
            state = LayerState(name, m, FAST_RULES[type(m)], self._recording)
            m.forward = types.MethodType(functools.partial(_fast_forward, state), m)
            self._layers.append(state)
            for p in m.parameters(recurse=False):
                self._param_layer[id(p)] = state

    def skip_duplicate_grads(self, params: list[Tensor]) -> None:
        """Stop autograd from computing the (unclipped) gradients of ``params`` in fast layers.

        Called by :func:`fast_clipping` for the parameters its optimizer owns: their clipped sum
        comes from the records, so autograd's own weight gradient would be wasted work. Recording
        providers are asked the same for theirs (those that can skip them say which).
        """
        self._recording.skip_ids.update(id(p) for p in params)
        for provider in self._providers_of(params):
            self._provider_skips.update(id(p) for p in provider.skip_duplicate_grads(params))

    def cleanup(self) -> None:
        """Remove every trace from the module: forwards, Opacus hooks and attributes, records."""
        if not self._recording.attached:
            return
        self._recording.attached = False
        for state in self._layers:
            state.calls.clear()
            state.module.__dict__.pop("forward", None)
        if self._fallback is not None:
            self._fallback.cleanup()
            for m in self._fallback._layers:
                for attr in ("activations", "max_batch_len"):
                    m.__dict__.pop(attr, None)
        self._recording.skip_ids.clear()
        self._workspace.clear()
        self._plan_cache = None

    # ------------------------------------------------------------------ the clipping step

    def clear(self, params: list[Tensor]) -> None:
        """Drop the records of the fast layers owning ``params`` (``zero_grad``)."""
        for state in self._layers_of(params):
            state.calls.clear()
        for provider in self._providers_of(params):
            provider.clear_records(params)

    def _providers_of(self, params: list[Tensor]) -> list[RecordingProvider]:
        owners = {id(self._provided[id(p)]) for p in params if id(p) in self._provided}
        return [prov for prov in self._providers if id(prov) in owners]

    def _layers_of(self, params: list[Tensor]) -> list[LayerState]:
        owners = {id(s) for s in (self._param_layer.get(id(p)) for p in params) if s is not None}
        return [s for s in self._layers if id(s) in owners]

    @torch.no_grad()
    def clipped_sum(self, params: list[Tensor], max_grad_norm: float) -> tuple[list[Tensor], int]:
        """The sum over samples of the flat-clipped per-sample gradients of ``params``.

        Each sample's gradient over all of ``params`` (fast and fallback layers together) is scaled
        by ``min(1, C / (‖g_i‖ + 1e-6))``, as Opacus' ``DPOptimizer.clip_and_accumulate`` does. The
        records of the fast layers involved are consumed.

        Returns:
            One tensor per parameter (its dtype), and the number of backward passes the records
            came from (Opacus' ``accumulated_iterations``; 1 for an empty batch).

        A parameter whose autograd gradient holds a use the records (or Opacus' per-sample
        gradients) did not see is refused; one the loss did not reach gets zero per-sample
        gradients and an :class:`UntrainedParameterWarning` (see :mod:`lightning_privacy.dp.coverage`).

        Raises:
            RuntimeError: after :meth:`cleanup`, or when the fast records and Opacus' per-sample
                gradients disagree on the batches.
            UncoveredParameterError: for a parameter with a gradient that no per-sample record or
                grad sample accounts for (used outside its layer's forward, or in no attached layer).
        """
        if not self._recording.attached:
            raise RuntimeError("These FastGradSampleHooks were cleaned up; attach new ones to train privately.")
        self._workspace.release()  # the previous step's tensors are gone
        plan = self._params_plan(params)
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32

        # Fast records, per pass: [(pass_id, prepared, params)].
        prepared: list[tuple[int, Prepared, list[Tensor]]] = []
        for state, mine in plan.layers:
            calls, state.calls = state.calls, []
            if not calls:
                continue
            first = calls[0].pass_id
            if all(c.pass_id == first for c in calls):  # one backward per step: the usual case
                by_pass: dict[int, list] = {first: calls}
            else:
                by_pass = defaultdict(list)
                for c in calls:
                    by_pass[c.pass_id].append(c)
            for pass_id, group in by_pass.items():
                prepared.append(
                    (pass_id, state.rule.prepare(state.module, group, self.batch_first, self._workspace), mine)
                )
        pass_ids = sorted({pid for pid, _, _ in prepared})
        sizes = {pid: obj.batch_size for pid, obj, _ in prepared}
        # The providers' records, per pass (each example's own gradients: no loss scale).
        provided: list[list[ProvidedGrads]] = []
        for provider in plan.providers:
            for k, records in enumerate(provider.take_records(params)):
                if k < len(provided):
                    provided[k].extend(records)
                else:
                    provided.append(records)
        if provided:
            provided_sizes = [records[0].batch_size for records in provided]
            if not pass_ids:
                pass_ids = list(range(len(provided)))
                sizes = dict(zip(pass_ids, provided_sizes, strict=True))
            if provided_sizes != [sizes[p] for p in pass_ids] or any(
                r.batch_size != records[0].batch_size for records in provided for r in records
            ):
                raise RuntimeError(
                    f"Per-sample batches disagree: fast layers saw {[sizes[p] for p in pass_ids]}, the "
                    f"per-sample providers {[[r.batch_size for r in records] for records in provided]}. Run "
                    "one forward and one backward per optimizer step."
                )
        provided_sq = [[r.sq_norms() for r in records] for records in provided]

        # Opacus' per-sample gradients of the fallback layers: one tensor per backward pass.
        fallback = {}
        for p in plan.fallback_params:
            gs = getattr(p, "grad_sample", None)
            fallback[id(p)] = [] if gs is None else (gs if isinstance(gs, list) else [gs])
        self._check_coverage(params, prepared, fallback, provided, provided_sq)
        fallback_sizes = next((([len(g) for g in v]) for v in fallback.values() if v), None)
        if pass_ids and fallback_sizes is not None and fallback_sizes != [sizes[p] for p in pass_ids]:
            raise RuntimeError(
                f"Per-sample batches disagree: fast layers saw {[sizes[p] for p in pass_ids]}, Opacus' grad "
                f"samplers {fallback_sizes}. Run one forward and one backward per optimizer step."
            )
        batch_sizes = [sizes[p] for p in pass_ids] if pass_ids else (fallback_sizes or [])
        offsets = [0]
        for b in batch_sizes:
            offsets.append(offsets[-1] + b)
        slot = {pid: slice(offsets[k], offsets[k + 1]) for k, pid in enumerate(pass_ids)}
        scale = {pid: float(sizes[pid]) if self.loss_reduction == "mean" else 1.0 for pid in pass_ids}

        if len(pass_ids) == 1 and not any(fallback.values()):
            # One pass, fast layers only (the usual step): the squared norms of all parameters
            # summed by one stacked reduction instead of one indexed add each.
            (pid,) = pass_ids
            parts = [obj.sq_norms(p).to(dtype) for _, obj, mine in prepared for p in mine]
            sq = torch.stack(parts).sum(0).mul_(scale[pid] ** 2) if parts else None
            if provided_sq:
                more = torch.stack([t.to(dtype) for t in provided_sq[0]]).sum(0)
                sq = more if sq is None else sq.add_(more)
        else:
            sq = torch.zeros(offsets[-1], dtype=dtype, device=plan.device)
            for pid, obj, mine in prepared:
                for p in mine:
                    sq[slot[pid]] += obj.sq_norms(p).to(dtype) * scale[pid] ** 2
            for pid, norms in zip(pass_ids if provided else [], provided_sq, strict=True):
                for t in norms:
                    sq[slot[pid]] += t.to(dtype)
            for gs_list in fallback.values():
                for k, gs in enumerate(gs_list):
                    sq[offsets[k] : offsets[k + 1]] += (
                        gs.reshape(len(gs), math.prod(gs.shape[1:])).to(dtype).square().sum(1)
                    )
        factor = (max_grad_norm / (sq.sqrt_().add_(1e-6))).clamp_(max=1.0)

        sums: dict[int, Tensor] = {}

        def add(p: Tensor, t: Tensor) -> None:
            sums[id(p)] = t if id(p) not in sums else sums[id(p)] + t

        for pid, obj, mine in prepared:
            weights = (factor[slot[pid]] * scale[pid]).to(obj.dtype)
            for p in mine:
                add(p, obj.weighted_sum(p, weights).to(dtype))
        wanted = {id(p) for p in params}
        for pid, records in zip(pass_ids if provided else [], provided, strict=True):
            for record in records:
                for p, t in zip(record.params, record.weighted_sums(factor[slot[pid]]), strict=True):
                    if id(p) in wanted:
                        add(p, t.to(dtype))
        for p in plan.fallback_params:
            for k, gs in enumerate(fallback[id(p)]):
                add(p, torch.einsum("i,i...", factor[offsets[k] : offsets[k + 1]], gs.to(dtype)))
        grads = [sums[id(p)].to(p.dtype) if id(p) in sums else torch.zeros_like(p) for p in params]
        return grads, max(1, len(batch_sizes))

    def _params_plan(self, params: list[Tensor]) -> _ParamsPlan:
        """Which fast layers and fallback parameters ``params`` involve: the same every step of an
        optimizer, so it is worked out once per list of parameters."""
        key = tuple(map(id, params))
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1]
        fast_ids = {id(p) for p in params if id(p) in self._param_layer}
        layers = [
            (s, [p for p in s.module.parameters(recurse=False) if id(p) in fast_ids])
            for s in self._layers_of([p for p in params if id(p) in fast_ids])
        ]
        # Parameters of no attached layer have no per-sample gradients: the coverage check
        # refuses them if autograd gave them a gradient, as in the other modes.
        fallback_params = [p for p in params if id(p) not in self._param_layer and id(p) not in self._provided]
        device = params[0].device if params else torch.device("cpu")
        plan = _ParamsPlan(layers, fallback_params, device, self._providers_of(params))
        self._plan_cache = (key, plan)
        return plan

    def _check_coverage(
        self,
        params: list[Tensor],
        prepared: list[tuple[int, Prepared, list[Tensor]]],
        fallback: dict[int, list[Tensor]],
        provided: list[list[ProvidedGrads]],
        provided_sq: list[list[Tensor]],
    ) -> None:
        """Refuse parameters with a gradient the per-sample records miss; warn for unreached ones."""
        recorded: dict[int, list[Prepared]] = defaultdict(list)
        for _, obj, mine in prepared:
            for p in mine:
                recorded[id(p)].append(obj)
        # A provider's parameters whose autograd gradient is kept (a user's tensor hook): it must
        # equal the sum of their records. Per parameter: [(Σ_i g_i as its share of autograd's
        # gradient, bound on Σ_i ‖g_i‖ of it)]; an empty list for a skipped one.
        from_providers: dict[int, list[tuple[Tensor, float]]] = {}
        for records, norms in zip(provided, provided_sq, strict=True):
            for record, sq in zip(records, norms, strict=True):
                for p in record.params:
                    from_providers.setdefault(id(p), [])
                if all(id(p) in self._provider_skips for p in record.params):
                    continue
                share = 1.0 / max(record.batch_size, 1) if self.loss_reduction == "mean" else 1.0
                ones = torch.full((record.batch_size,), share, dtype=sq.dtype, device=sq.device)
                size = float(sq.sqrt().sum()) * share
                for p, total in zip(record.params, record.weighted_sums(ones), strict=True):
                    from_providers[id(p)].append((total.double(), size))
        uncovered, untrained = [], []
        # Fast-layer parameters whose autograd gradient is skipped: any gradient they have comes
        # from a use outside their layer. Checked together, after the loop.
        skipped: list[tuple[str, Tensor]] = []
        for p in params:
            name = self.param_names.get(id(p), f"<parameter of shape {tuple(p.shape)}>")
            if id(p) in self._provided:
                terms = from_providers.get(id(p))
                if terms is None:
                    (uncovered if coverage.nonzero(p.grad) else untrained).append(name)
                elif id(p) in self._provider_skips:
                    skipped.append((name, p))
                else:
                    tol = max(coverage.TOLERANCE[torch.float32], coverage.TOLERANCE.get(p.dtype, 0.0))
                    if coverage.disagrees(p.grad, sum(t for t, _ in terms), sum(size for _, size in terms), tol):
                        uncovered.append(name)
            elif id(p) in self._param_layer:
                objs = recorded.get(id(p))
                if not objs:
                    (uncovered if coverage.nonzero(p.grad) else untrained).append(name)
                elif self._param_layer[id(p)].wants_grad(p):
                    # autograd computed the whole gradient (a user's tensor hook): it must equal
                    # the sum of the recorded per-sample gradients
                    total = sum(obj.weighted_sum(p, torch.ones(obj.batch_size, dtype=obj.dtype, device=p.device))
                                .double() for obj in objs)  # fmt: skip
                    size = sum(float(obj.sq_norms(p).sqrt().sum()) for obj in objs)
                    if coverage.disagrees(p.grad, total, size, coverage.TOLERANCE[torch.float32]):
                        uncovered.append(name)
                else:
                    skipped.append((name, p))
            elif not fallback[id(p)]:
                (uncovered if coverage.nonzero(p.grad) else untrained).append(name)
            else:
                mean = self.loss_reduction == "mean"
                weighted = [(g, 1 / len(g) if mean and len(g) else 1.0) for g in fallback[id(p)]]
                if coverage.disagrees(p.grad, *coverage.per_sample_total(weighted)):
                    uncovered.append(name)
        flags = coverage.nonzero_each([p.grad for _, p in skipped])
        uncovered += [name for (name, _), used_outside in zip(skipped, flags, strict=True) if used_outside]
        if uncovered:
            raise coverage.uncovered_error(uncovered, "fast")
        if untrained:
            coverage.warn_untrained(untrained, self._untrained_warned)
