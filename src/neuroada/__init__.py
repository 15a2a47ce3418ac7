"""NeuroAda parameter-efficient fine-tuning (arXiv 2510.18940) as a PEFT method.

``import neuroada`` registers the method with PEFT; then ``get_peft_model(model, NeuroAdaConfig(...))``,
``PeftModel.from_pretrained`` and the rest of PEFT's API work with NeuroAda adapters.
"""

from . import _peft_integration
from .bypass import build_pattern, linear_with_bypass, sparse_bypass, sparse_bypass_reference
from .config import NeuroAdaConfig
from .layer import NeuroAdaLayer, NeuroAdaLinear
from .learning_rate import NeuroAdaLearningRateWarning, suggested_learning_rate
from .model import AdapterLoadError, NeuroAdaModel
from .selection import index_dtype_for, select_per_neuron, select_top_k_scores, selection_fingerprint
from .calibration import calibrate_selection

_peft_integration.register(NeuroAdaConfig, NeuroAdaModel)

__version__ = "0.1.0"

__all__ = [
    "AdapterLoadError",
    "NeuroAdaConfig",
    "NeuroAdaLayer",
    "NeuroAdaLearningRateWarning",
    "NeuroAdaLinear",
    "NeuroAdaModel",
    "build_pattern",
    "calibrate_selection",
    "index_dtype_for",
    "linear_with_bypass",
    "select_per_neuron",
    "select_top_k_scores",
    "selection_fingerprint",
    "sparse_bypass",
    "sparse_bypass_reference",
    "suggested_learning_rate",
]
