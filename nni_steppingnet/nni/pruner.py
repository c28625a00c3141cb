"""SteppingNet as an NNI 3.0 training-aware pruner.

:class:`SteppingNetPruner` is built like NNI's own training-aware pruners (``SlimPruner``,
``MovementPruner``): ``(model, config_list, evaluator, ...)``, where the evaluator is a
``nni.compression.TorchEvaluator`` wrapping the user's training function and a ``nni.trace``-d
optimizer. SteppingNet's own settings (budgets, ``alpha_growth``, ``beta``, ``gamma``, ``m``,
``N_t``) are constructor arguments, because NNI's config schema rejects unknown keys.

``compress()`` runs the construction of paper Fig. 3 *through the user's training loop*:

* every ``optimizer.step()`` of the loop is one subnet-batch. An iteration is ``N * m`` steps:
  subnet 1 for ``m`` steps, then subnet 2 for ``m`` steps, ... (the order of
  :class:`nni_steppingnet.construct.Constructor`);
* before each forward the model computes the subnet being trained, the neuron importance of
  eq. (2) is collected from each backward (:class:`~nni_steppingnet.importance.ImportanceTracker`)
  and the gradients of smaller subnets are suppressed by ``beta`` (paper III-A2);
* after every ``N * m`` steps the neurons are moved and small weights pruned exactly as in
  :meth:`Constructor.step`; construction ends when every budget is met (or after ``N_t``
  iterations), then ``retraining_steps`` more steps train the subnets in turn with the
  distillation loss of eq. (4) (``gamma``) against a frozen copy of the original model.

The loop is stopped by the pruner once its work is done, so ``training_func`` may loop for as
many epochs as it likes; it should honour ``max_steps`` as NNI asks.

It returns ``(model, masks)`` in NNI's ``{module_name: {'weight': mask, 'bias': mask}}`` form for
one subnet (``subnet=``, default the largest): the model comes back wrapped by NNI with these
masks applied, computing exactly that subnet, like every NNI pruner. All subnets stay available:
:meth:`SteppingNetPruner.subnet_masks` and :meth:`SteppingNetPruner.select_subnet` give and apply
the masks of any subnet, and :attr:`SteppingNetPruner.stepping_state` rebuilds the full
:class:`~nni_steppingnet.SteppingNet` (runtime, export through torch-pruning). NNI's
``ModelSpeedup`` is never used: it crashes on current torch.

``config_list`` chooses the layers that take part, as for NNI's pruners (``op_types``,
``op_names``, ``op_names_re``, ``exclude_op_*``). Output channels of Conv2d/Linear layers that
are not selected never move: they stay in subnet 1, hence in every subnet (channels coupled with
them by a residual add stay as well). Their input synapses from moved neurons are still masked,
so the masks cover every Conv2d/Linear layer.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from nni.compression.base.compressor import Pruner
from nni.compression.base.config import select_modules_by_config, trans_legacy_config_list
from nni.compression.base.target_space import TargetType
from nni.compression.utils import Evaluator

from ..construct import ConstructionConfig, ConstructionResult, Constructor
from ..graph import WEIGHTED_TYPES
from ..stepping import SteppingNet
from ..train import BetaSuppression
from ..validation import NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, UNIT_CLOSED, check_budgets, check_subnet

__all__ = ["SteppingNetPruner", "NNIMasks", "selected_layers"]

logger = logging.getLogger(__name__)

#: NNI's mask format: ``{module_name: {'weight': mask, 'bias': mask}}``.
NNIMasks = dict[str, dict[str, torch.Tensor]]

_SELECTION_KEYS = frozenset(
    {"op_types", "op_names", "op_names_re", "exclude_op_types", "exclude_op_names", "exclude_op_names_re"}
)
_SPARSITY_KEYS = frozenset(
    {
        "sparse_ratio",
        "sparse_threshold",
        "max_sparse_ratio",
        "min_sparse_ratio",
        "sparsity",
        "sparsity_per_layer",
        "total_sparsity",
        "max_sparsity_per_layer",
        "global_group_id",
        "dependency_group_id",
        "granularity",
        "target_names",
        "target_settings",
        "internal_metric_block",
        "apply_method",
        "align",
    }
)


class _Finished(BaseException):
    """Raised from the patched optimizer step to end the user's training loop.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that a training function catching
    ``Exception`` does not swallow it.
    """


def selected_layers(model: nn.Module, config_list: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of the Conv2d/Linear modules that ``config_list`` selects (NNI's selection rules).

    Raises ``ValueError`` for keys SteppingNet does not use (sparsity settings: the budgets set the
    sparsity), for ``op_names`` that are not modules of ``model`` and for selected modules that
    are not Conv2d/Linear.
    """
    if isinstance(config_list, Mapping) or not isinstance(config_list, (list, tuple)) or not config_list:
        raise ValueError("config_list must be a non-empty list of dicts such as [{'op_types': ['Conv2d', 'Linear']}]")
    for i, config in enumerate(config_list):
        if not isinstance(config, Mapping):
            raise ValueError(f"config_list[{i}] must be a dict, got {type(config).__name__}")
        sparsity = sorted(set(config) & _SPARSITY_KEYS)
        if sparsity:
            raise ValueError(
                f"config_list[{i}] sets {sparsity}: SteppingNetPruner sets the sparsity "
                "of every subnet from its budgets= argument; keep only the layer "
                f"selection keys {sorted(_SELECTION_KEYS)} in config_list"
            )
        unknown = sorted(set(config) - _SELECTION_KEYS - {"exclude"})
        if unknown:
            raise ValueError(
                f"config_list[{i}] has unknown keys {unknown}; allowed are "
                f"{sorted(_SELECTION_KEYS)} (and the legacy 'exclude': True)"
            )
        for key in _SELECTION_KEYS & set(config):
            values = config[key]
            if (
                isinstance(values, str)
                or not isinstance(values, (list, tuple))
                or not all(isinstance(v, str) for v in values)
            ):
                raise ValueError(f"config_list[{i}]['{key}'] must be a list of strings, got {values!r}")
        if "exclude" not in config and not {"op_types", "op_names", "op_names_re"} & set(config):
            raise ValueError(f"config_list[{i}] selects nothing: give 'op_types', 'op_names' or 'op_names_re'")
    modules = dict(model.named_modules())
    missing = sorted(
        {
            name
            for config in config_list
            for key in ("op_names", "exclude_op_names")
            for name in config.get(key, ())
            if name not in modules
        }
    )
    if missing:
        raise ValueError(
            f"config_list names modules that the model does not have: {missing[:8]}; "
            "use names from model.named_modules()"
        )
    translated = trans_legacy_config_list(copy.deepcopy([dict(c) for c in config_list]))
    chosen: set[str] = set()
    for config in translated:
        if config.get("exclude"):
            continue
        picked, _, _ = select_modules_by_config(model, config)
        chosen.update(picked)
    wrong = sorted(name for name in chosen if not isinstance(modules[name], WEIGHTED_TYPES))
    if wrong:
        kinds = sorted({type(modules[name]).__name__ for name in wrong})
        raise ValueError(
            f"config_list selects {kinds} modules ({wrong[:5]}...): SteppingNet moves the "
            "neurons (output channels) of Conv2d and Linear layers; BatchNorm and other "
            "per-channel modules follow their layer. Use op_types=['Conv2d', 'Linear']"
        )
    if not chosen:
        raise ValueError("config_list selects no Conv2d/Linear layer of the model")
    order = {name: k for k, name in enumerate(modules)}
    return sorted(chosen, key=order.__getitem__)


class SteppingNetPruner(Pruner):
    """Construct SteppingNet's nested subnets inside NNI's compression API.

    Args:
        model: the network to compress (any CNN SteppingNet can wrap: timm ResNets, VGG, ...).
        config_list: which layers take part, as for NNI's pruners, e.g.
            ``[{'op_types': ['Conv2d', 'Linear'], 'exclude_op_names': ['conv1']}]``. Sparsity keys
            (``sparse_ratio``...) are rejected: the budgets decide the sparsity.
        evaluator: a ``TorchEvaluator(training_func, nni.trace(torch.optim.SGD)(...),
            training_step, dummy_input=...)``. The training function must call
            ``optimizer.step()`` once per batch (one backward per step).
        budgets: MACs of subnet ``i`` as a fraction of ``reference_macs``, strictly ascending,
            one per subnet (their number is N).
        example_inputs: a small batch for tracing the model (default: the evaluator's
            ``dummy_input``).
        subnet: whose masks ``compress()`` returns and applies (default N, the largest).
        reference_macs: MACs the budgets refer to (default: the model's MACs as given).
        batches_per_iteration: ``m``, optimizer steps per subnet per iteration.
        iterations: ``N_t``, the most construction iterations.
        alpha_growth: ``alpha_{k+1} / alpha_k`` of eq. (3).
        beta: gradient suppression of smaller subnets (``None`` or 1.0: off).
        gamma: weight of the training loss against distillation in the retraining steps (eq. 4).
        retraining_steps: optimizer steps after construction, subnets 1..N in turn, each with the
            loss ``gamma * loss + (1 - gamma) * KL(teacher || student)`` where the teacher is a
            frozen copy of ``model`` as given (0: no retraining, no copy).
        temperature: distillation temperature.
        prune_threshold: unstructured pruning of ``|W| <`` threshold after every iteration.
        classifier: the logits layer (default: timm's ``get_classifier()`` or the last Linear).
        iteration_callback: ``callback(entry)`` after every construction iteration (the history
            entry of :class:`~nni_steppingnet.construct.Constructor`), e.g. to report to NNI.
        seed: recorded in the construction config.
    """

    def __init__(
        self,
        model: nn.Module,
        config_list: list[dict[str, Any]],
        evaluator: Evaluator,
        budgets: Sequence[float],
        *,
        example_inputs: Any = None,
        subnet: int | None = None,
        reference_macs: int | None = None,
        batches_per_iteration: int = 250,
        iterations: int = 300,
        alpha_growth: float = 1.5,
        beta: float | None = 0.9,
        gamma: float = 0.4,
        retraining_steps: int = 0,
        temperature: float = 1.0,
        prune_threshold: float = 1e-5,
        classifier: nn.Module | str | None = None,
        iteration_callback: Callable[[dict[str, Any]], None] | None = None,
        seed: int = 0,
        existed_wrappers: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(evaluator, Evaluator):
            raise TypeError(
                "evaluator must be an NNI evaluator such as nni.compression.TorchEvaluator("
                f"training_func, traced_optimizer, training_step), got {type(evaluator).__name__}"
            )
        if existed_wrappers is not None:
            raise ValueError(
                "SteppingNetPruner cannot be fused with other compressors "
                "(from_compressor / existed_wrappers): it owns every Conv2d/Linear weight"
            )
        # The construction settings are checked by ConstructionConfig below (the rules recipes use).
        budgets = check_budgets(list(budgets) if isinstance(budgets, tuple) else budgets)
        num_subnets = len(budgets)
        if subnet is None:
            subnet = num_subnets
        check_subnet(subnet, num_subnets)
        NON_NEGATIVE_INT.check("retraining_steps", retraining_steps)
        UNIT_CLOSED.check("gamma", gamma)
        POSITIVE.check("temperature", temperature)
        if iteration_callback is not None and not callable(iteration_callback):
            raise TypeError("iteration_callback must be callable")
        if example_inputs is None:
            example_inputs = evaluator.get_dummy_input()
            if example_inputs is None:
                raise ValueError(
                    "pass example_inputs=<a small batch> or build the evaluator with "
                    "TorchEvaluator(..., dummy_input=<a small batch>): SteppingNet traces "
                    "the model with it"
                )
        if any(isinstance(m, nn.Module) and hasattr(m, "_nni_wrapper") for m in model.modules()):
            raise ValueError(
                "the model is already wrapped by an NNI compressor; unwrap it first (compressor.unwrap_model())"
            )

        if reference_macs is not None:
            POSITIVE_INT.check("reference_macs", reference_macs)
        settings: dict[str, Any] = {
            "budgets": list(budgets),
            "batches_per_iteration": batches_per_iteration,
            "iterations": iterations,
            "alpha_growth": alpha_growth,
            "beta": beta,
            "prune_threshold": prune_threshold,
            "seed": seed,
        }
        ConstructionConfig(reference_macs=reference_macs or 1, **settings)  # check before touching the model
        chosen = selected_layers(model, config_list)
        all_layers = [name for name, m in model.named_modules() if isinstance(m, WEIGHTED_TYPES)]
        self.user_config_list = copy.deepcopy(list(config_list))
        self.selected_layers: list[str] = chosen
        self.teacher: nn.Module | None = None
        if retraining_steps > 0 and gamma < 1.0:
            self.teacher = copy.deepcopy(model).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)

        # NNI registers a wrapper (weight and bias targets) on every Conv2d/Linear: the masks of
        # every subnet touch layers that are not selected too (their inputs from moved neurons).
        internal = [{"op_names": all_layers}]
        super().__init__(model, internal, evaluator, existed_wrappers=None)
        self.evaluator: Evaluator
        # SteppingNet masks through a parametrization while the loop trains; the NNI wrappers go
        # back on at the end with the chosen subnet's masks.
        self.unwrap_model()
        self.net: SteppingNet | None = SteppingNet(model, example_inputs, num_subnets, classifier=classifier)
        net = self.net
        device = _model_device(model)
        self.reference_macs = int(net.full_macs if reference_macs is None else reference_macs)
        self.config = ConstructionConfig(reference_macs=self.reference_macs, **settings)
        frozen = torch.zeros(net.num_neurons + 1, dtype=torch.bool)
        selected = set(chosen)
        for k, layer in enumerate(net.layers):
            if not layer.is_logits and layer.name not in selected:
                frozen[net.index.out_positions[k]] = True
        self.frozen_neurons = frozen[:-1].clone()
        self.num_subnets = num_subnets
        self.subnet = subnet
        self.gamma = float(gamma)
        self.beta = None if beta is None else float(beta)
        self.retraining_steps = retraining_steps
        self.temperature = float(temperature)
        self.iteration_callback = iteration_callback
        # The user's loop trains; the constructor only finishes each iteration (moves, prunes):
        # the driver calls finish_iteration() with the mean loss of the steps it saw.
        self._constructor = Constructor(net, self.config, device=device, train=_no_training, frozen=self.frozen_neurons)
        self._param_names = {
            f"{layer.name}.weight": f"{layer.name}.parametrizations.weight.original" for layer in net.layers
        }
        self.history: list[dict[str, Any]] = []
        self.result: ConstructionResult | None = None
        self.stepping_state: dict[str, Any] | None = None
        self.subnet_macs: list[int] = []
        self._masks: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = {}
        self._compressed = False

    # ------------------------------------------------------------------ NNI API
    def compress(self) -> tuple[nn.Module, NNIMasks]:  # type: ignore[override]
        """Construct the subnets through the evaluator's training loop.

        Returns ``(model, masks)``: the model wrapped by NNI with the masks of subnet
        ``self.subnet`` applied, and those masks (``{name: {'weight': ..., 'bias': ...}}``).
        """
        if self._compressed:
            raise RuntimeError("compress() already ran; use select_subnet(s) / subnet_masks(s)")
        return super().compress(None, None)

    def _single_compress(self, max_steps: int | None, max_epochs: int | None) -> None:
        net = self.net
        assert net is not None
        constructor = self._constructor
        n, m = self.num_subnets, self.config.batches_per_iteration
        upper = (self.config.iterations - constructor.iteration) * n * m + self.retraining_steps
        driver = _LoopDriver(self, constructor)
        self.evaluator.bind_model(self.bound_model, self._param_names)
        try:
            if driver.start():
                self.evaluator.patch_loss(driver.loss_patch)
                self.evaluator.patch_optimizer_step(
                    before_step_tasks=[driver.before_step], after_step_tasks=[driver.after_step]
                )
                try:
                    self.evaluator.train(max_steps=max(upper, 1), max_epochs=None)
                except _Finished:
                    pass
            if not driver.finished:
                # A Python warning as well as the log record: the user must act on it, and the
                # package's loggers stay silent (NullHandler) unless the application configures logging.
                message = (
                    f"SteppingNetPruner: the training function returned after {driver.steps} "
                    f"optimizer steps, before the construction finished ({constructor.iteration} "
                    f"of at most {self.config.iterations} iterations, retraining "
                    f"{driver.retrain_done} of {self.retraining_steps} steps); give it more "
                    "data/epochs or honour max_steps"
                )
                logger.warning("%s", message)
                warnings.warn(message, UserWarning, stacklevel=3)
        finally:
            driver.close()
            self.evaluator.unbind_model()
        self._finish()

    # ------------------------------------------------------------------ finish
    def _finish(self) -> None:
        net = self.net
        assert net is not None
        constructor = self._constructor
        self.result = constructor.result()
        self.history = [dict(entry) for entry in constructor.history]
        if not self.result.all_met:
            message = (
                f"SteppingNetPruner: budgets met {self.result.budgets_met} after "
                f"{self.result.iterations} iterations (MAC ratios "
                f"{[round(r, 4) for r in self.result.mac_ratios]} vs budgets {self.config.budgets}); "
                "raise iterations or check that the budgets are reachable"
            )
            logger.warning("%s", message)
            warnings.warn(message, UserWarning, stacklevel=3)
        self.subnet_macs = [net.macs(s) for s in range(1, self.num_subnets + 1)]
        flat = net.flat_assignment()
        for s in range(1, self.num_subnets + 1):
            per_layer: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
            for k, layer in enumerate(net.layers):
                weight_mask = net.weight_mask(k, s).bool()
                if layer.is_logits:
                    bias_mask = torch.ones(weight_mask.shape[0], dtype=torch.bool)
                else:
                    bias_mask = flat[net.index.out_positions[k]] <= s
                per_layer[layer.name] = (weight_mask.clone(), bias_mask)
            self._masks[s] = per_layer
        state = net.state_dict()
        state["model"] = {k: v.detach().cpu().clone() for k, v in state["model"].items()}
        self.stepping_state = state
        constructor.close()
        net.remove()
        self.net = None
        # Trained weights go into NNI's wrappers, then NNI's masks take over from the parametrization.
        for wrapper in self._module_wrappers.values():
            for target_name, target_space in wrapper.pruning_target_spaces.items():
                if target_space.type is not TargetType.PARAMETER or target_space.target is None:
                    continue
                trained = getattr(wrapper.module, target_name)
                with torch.no_grad():
                    target_space.target.data = trained.detach().clone().to(target_space.target.device)
        self.wrap_model()
        self._compressed = True
        self.select_subnet(self.subnet)

    def subnet_masks(self, s: int) -> NNIMasks:
        """NNI-format masks (float 0/1, like NNI's) that make the model compute subnet ``s``."""
        if not self._masks:
            raise RuntimeError("no masks yet: call compress() first")
        check_subnet(s, self.num_subnets)
        out: NNIMasks = {}
        for name, (weight_mask, bias_mask) in self._masks[s].items():
            wrapper = self._module_wrappers[name]
            spaces = wrapper.pruning_target_spaces
            dtype = spaces["weight"].target.dtype if "weight" in spaces else torch.float32
            entry = {"weight": weight_mask.to(dtype)}
            if "bias" in spaces and spaces["bias"].target is not None and bias_mask is not None:
                entry["bias"] = bias_mask.to(dtype)
            out[name] = entry
        return out

    def select_subnet(self, s: int) -> NNIMasks:
        """Apply subnet ``s``'s masks to the wrapped model and return them."""
        masks = self.subnet_masks(s)
        self.update_masks(masks)
        self.subnet = s
        return masks

    @property
    def excluded_layers(self) -> list[str]:
        """Conv2d/Linear layers whose output channels were kept in subnet 1 (not selected)."""
        return [name for name in self._module_wrappers if name not in set(self.selected_layers)]


class _LoopDriver:
    """The state machine run from inside the user's training loop (optimizer-step patches)."""

    def __init__(self, pruner: SteppingNetPruner, constructor: Constructor) -> None:
        self.pruner = pruner
        self.constructor = constructor
        self.net = constructor.net
        self.n = pruner.num_subnets
        self.m = pruner.config.batches_per_iteration
        self.local = 0  # optimizer steps in the current construction iteration
        self.steps = 0
        self.retrain_done = 0
        self.phase = "construction"
        self.finished = False
        self._subnet_stack = contextlib.ExitStack()
        self._collect_stack = contextlib.ExitStack()
        self._handles: list[Any] = []
        self._kd_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._kd_output: Any = None
        self.pending_losses: list[float] = []
        beta = pruner.beta
        self.suppression = BetaSuppression(self.net, 1, beta) if beta is not None and beta != 1.0 else None

    # ----------------------------------------------------------------- phases
    def start(self) -> bool:
        """Enter the first step's contexts; False when there is nothing to train."""
        if self.constructor.done:
            logger.info("every budget is met before construction: going straight to retraining")
            if self.pruner.retraining_steps == 0:
                self.finished = True
                return False
            self._begin_retraining()
        else:
            self._enter(1, collect=True)
        return True

    def _current_subnet(self) -> int:
        if self.phase == "construction":
            return self.local // self.m + 1
        return self.retrain_done % self.n + 1

    def _enter(self, s: int, *, collect: bool) -> None:
        self._subnet_stack.close()
        self._subnet_stack = contextlib.ExitStack()
        self._subnet_stack.enter_context(self.net.subnet(s))
        if self.suppression is not None:
            self.suppression.subnet = s
        if collect:
            self._collect_stack = contextlib.ExitStack()
            self._collect_stack.enter_context(self.constructor.tracker.collect(subnet=s))

    def _begin_retraining(self) -> None:
        if self.pruner.retraining_steps == 0:
            self._stop()
        self.phase = "retraining"
        if self.pruner.teacher is not None:
            model = self.pruner.bound_model
            self.pruner.teacher.to(_model_device(model))
            self._handles.append(model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._capture_output))
        self._enter(1, collect=False)

    def _stop(self) -> None:
        self.finished = True
        raise _Finished()

    # ------------------------------------------------------------------ patches
    def before_step(self) -> None:
        # The backward of this step is done: close the importance collection of its batch.
        self._collect_stack.close()

    def after_step(self) -> None:
        if self.finished:  # the loop swallowed _Finished: stop it again
            raise _Finished()
        self.steps += 1
        if self.phase == "construction":
            self.local += 1
            if self.local == self.n * self.m:
                self.local = 0
                losses, self.pending_losses = self.pending_losses, []
                entry = self.constructor.finish_iteration(sum(losses) / len(losses) if losses else float("nan"))
                if self.pruner.iteration_callback is not None:
                    self.pruner.iteration_callback(dict(entry))
                if self.constructor.done:
                    self._begin_retraining()
                    return
            self._enter(self._current_subnet(), collect=True)
        else:
            self.retrain_done += 1
            if self.retrain_done >= self.pruner.retraining_steps:
                self._stop()
            self._enter(self._current_subnet(), collect=False)

    def loss_patch(self, loss: torch.Tensor, batch: Any) -> torch.Tensor:
        if self.phase == "construction":
            self.pending_losses.append(float(loss.detach()))
            return loss
        teacher = self.pruner.teacher
        if teacher is None or self._kd_inputs is None or not isinstance(self._kd_output, torch.Tensor):
            return loss
        args, kwargs = self._kd_inputs
        with torch.no_grad():
            teacher_logits = teacher(*args, **kwargs)
        t = self.pruner.temperature
        student = self._kd_output.float()
        kl = F.kl_div(
            F.log_softmax(student / t, dim=-1),
            F.log_softmax(teacher_logits.float() / t, dim=-1),
            reduction="batchmean",
            log_target=True,
        ) * (t * t)
        gamma = self.pruner.gamma
        return gamma * loss + (1.0 - gamma) * kl

    def _capture_inputs(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._kd_inputs = (args, kwargs)

    def _capture_output(self, module: nn.Module, args: Any, output: Any) -> None:
        self._kd_output = output

    def close(self) -> None:
        self._collect_stack.close()
        self._subnet_stack.close()
        if self.suppression is not None:
            self.suppression.remove()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._kd_inputs = None
        self._kd_output = None


def _no_training(constructor: Constructor) -> float:
    raise RuntimeError(
        "SteppingNetPruner trains in the evaluator's loop; its constructor is driven through finish_iteration()"
    )


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")
