"""NeuroAdaConfig: the PEFT configuration of a NeuroAda adapter."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from ._peft_integration import NEUROADA_PEFT_TYPE
from .bypass import BACKENDS
from .files import check_adapter_file
from .selection import DATA_CRITERIA, SELECTION_CRITERIA


@dataclass
class NeuroAdaConfig(PeftConfig):
    """Configuration of a NeuroAda adapter (arXiv 2510.18940).

    For every output neuron (row of W) of each adapted layer, NeuroAda selects ``k`` input connections before
    training (data-free) and trains one bypass scalar per connection, initialised to zero. W stays frozen; the
    layer computes ``y = x W^T + b + x S^T`` with S holding the scalars at the selected positions, and merging adds
    them into W once.

    Args:
        k (`int`):
            Trainable connections per output neuron. ``k=1`` trains ``out_features`` scalars per layer (about 0.02% of
            LLaMA-7B with all seven projections); ``k=20`` about 0.4%. Layers with fewer than ``k`` inputs train all
            their inputs (``k`` is capped at ``in_features`` with a warning naming those layers).
        target_modules (`Optional[Union[list[str], str]]`):
            Which modules to adapt, by PEFT's rules: a list of names matched as suffixes, a regex string, or
            ``"all-linear"`` (every ``nn.Linear``/``Conv1D`` but the output head). ``None`` means ``"all-linear"``,
            the paper's setting. Only ``nn.Linear`` and transformers' ``Conv1D`` can be adapted.
        exclude_modules (`Optional[Union[list[str], str]]`):
            Modules never to adapt, by the same rules as ``target_modules``.
        modules_to_save (`Optional[list[str]]`):
            Modules trained in full and saved with the adapter, e.g. a new classifier head (``["classifier"]``).
        trainable_token_indices (`Optional[Union[list[int], dict[str, list[int]]]]`):
            Embedding rows to train and save with the adapter, e.g. the ids of tokens added to the tokenizer (PEFT's
            trainable tokens, as in ``LoraConfig``): a list for the input embedding, or ``{"embed_tokens": [...]}``
            by module name. TRL's ``SFTTrainer`` fills it in when ``chat_template_path`` adds tokens.
        selection (`str`):
            How connections are chosen per neuron: ``"magnitude"`` (largest ``|W[i, j]|``, the paper's default),
            ``"smallest"`` (smallest ``|W[i, j]|``) or ``"random"`` (uniform, reproducible from ``seed``), all from
            the weights at injection; or from calibration data: ``"activation"`` (``|W[i, j]|`` times the L2 norm of
            input j over the batches, as Wanda) or ``"gradient"`` (``|dL/dW[i, j] * W[i, j]|`` summed over the
            batches). A data criterion needs ``neuroada.calibrate_selection(peft_model, batches)`` after
            ``get_peft_model`` (until then the adapter refuses to run and to save) and ``save_indices=True``.
        seed (`int`):
            Seed of ``selection="random"`` (combined with each layer's name); ignored otherwise.
        init_weights (`bool`):
            ``True`` (default): deltas start at zero, so the adapted model equals the base model. ``False``: small
            random deltas (normal, std 0.02), for tests and debugging.
        save_indices (`bool`):
            ``True`` (default): the adapter file stores the selected indices beside the deltas. ``False``: it stores
            the deltas, plus the indices of the few rows whose selection a bf16/fp16 copy of the base could break
            differently (ties after rounding); the rest is recomputed from the base weights at load time, checked
            against a per-layer fingerprint, and a base whose selection differs is refused. Either way the adapter
            loads on the same weights in another precision.
        bypass_backend (`str`):
            How the sparse bypass is computed: ``"auto"`` (default; chosen per call from device, shape, k and token
            count by :func:`neuroada.bypass.choose_backend`), ``"fused"`` (one matmul on a temporary ``W + S`` that
            autograd does not keep; used only where the base forward is exactly ``x W^T + b``: a plain frozen
            float32 ``nn.Linear``/``Conv1D`` without hooks, outside autocast), ``"triton"`` (GPU kernels),
            ``"gather"`` (sparse kernels, O(tokens * out * k), added to the base output) or ``"dense"`` (a temporary
            dense S, added likewise). A property of the machine, not of the adapter: where the named backend cannot
            run (Triton on a CPU), the same bypass is computed by another one, with one warning.
        calibration (`Optional[dict]`):
            Written by ``calibrate_selection`` for a data criterion: the data it used (``batches``, ``samples``,
            ``tokens``). Leave it unset.
        selected_weight_sums (`Optional[dict[str, float]]`):
            Written by ``calibrate_selection``: per layer, the sum of ``|W|`` over the selected connections, which a
            load compares with the base it loads on (a data-chosen selection is no top-k of ``|W|``, so this is
            how another base is told apart). Leave it unset.
        selection_fingerprints (`Optional[dict[str, str]]`):
            Written by ``save_pretrained``: a short hash of each layer's selection, used at load time to detect an
            adapter loaded on other base weights. Leave it unset.
        quantized_base (`Optional[str]`):
            Written by ``save_pretrained``: ``"4bit"`` or ``"8bit"`` when the adapted layers were bitsandbytes layers
            (their selection ranked the rounded weights), so that a load on an unquantized base can say that its own
            selection is expected to differ. Leave it unset.
    """

    k: int = field(default=1, metadata={"help": "Trainable connections per output neuron (>= 1)."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Modules to adapt: names (suffix match), a regex, or 'all-linear'. None means 'all-linear'."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules never to adapt: names (suffix match) or a regex."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules trained in full and saved with the adapter, e.g. a new classifier head."},
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None,
        metadata={"help": "Embedding rows to train and save with the adapter: token ids, or {module name: ids}."},
    )
    selection: str = field(
        default="magnitude",
        metadata={"help": f"Per-neuron selection criterion, one of {SELECTION_CRITERIA}."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of selection='random'."})
    init_weights: bool = field(
        default=True, metadata={"help": "Zero deltas (identity at init); False gives small random deltas."}
    )
    save_indices: bool = field(
        default=True,
        metadata={"help": "Store indices in the adapter file; False recomputes them from the base weights at load."},
    )
    bypass_backend: str = field(
        default="auto", metadata={"help": f"Sparse bypass implementation, one of {BACKENDS}."}
    )
    calibration: Optional[dict] = field(
        default=None, metadata={"help": "The data a data-aware selection used, written by calibrate_selection."})
    selected_weight_sums: Optional[dict[str, float]] = field(
        default=None, metadata={"help": "Per-layer sums of |W| at the selection, written by calibrate_selection."})
    selection_fingerprints: Optional[dict[str, str]] = field(
        default=None, metadata={"help": "Per-layer selection hashes, written by save_pretrained. Leave unset."}
    )
    quantized_base: Optional[str] = field(
        default=None, metadata={"help": "The training base's quantization, written by save_pretrained. Leave unset."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = NEUROADA_PEFT_TYPE
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"NeuroAdaConfig: k must be an integer >= 1 (connections per neuron), got {self.k!r}")
        if self.selection not in SELECTION_CRITERIA:
            raise ValueError(
                f"NeuroAdaConfig: selection={self.selection!r} is unknown; use one of {SELECTION_CRITERIA}"
            )
        if self.selection in DATA_CRITERIA and not self.save_indices:
            raise ValueError(
                f"NeuroAdaConfig: selection={self.selection!r} is chosen from calibration data, which a load does not "
                "have, so the indices could not be recomputed from the base weights at load time: keep "
                "save_indices=True (the default) with a data-aware selection"
            )
        if self.calibration is not None and self.selection not in DATA_CRITERIA:
            raise ValueError(
                f"NeuroAdaConfig: calibration={self.calibration!r} is recorded for the data-aware selections "
                f"{DATA_CRITERIA} only, but selection={self.selection!r}; leave calibration unset"
            )
        if self.bypass_backend not in BACKENDS:
            raise ValueError(
                f"NeuroAdaConfig: bypass_backend={self.bypass_backend!r} is unknown; use one of {BACKENDS}"
            )
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.target_modules is None:
            self.target_modules = "all-linear"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """PEFT's loader, plus a check of the weights file beside the config before any model is touched."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        directory = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if os.path.isdir(directory):
            check_adapter_file(directory)
        return config
