"""Numeric quantization primitives: specs, pure tensor functions, torch.library ops, observers.

Importing this package registers the ``qpass::*`` ops (once). Never imports torch.fx.
"""
from qpass.primitives import ops as ops  # registers torch.ops.qpass.*
from qpass.primitives import formats as formats
from qpass.primitives import bcq as bcq  # registers the bcq* formats
from qpass.primitives import hadamard as hadamard  # registers torch.ops.qpass.hadamard
from qpass.primitives import olive as olive  # registers the olive4..olive8 formats (OliVe pair encoding)
from qpass.primitives.awq import awq_scales as awq_scales
from qpass.primitives.awq import clip_search as clip_search
from qpass.primitives.awq import output_error as output_error
from qpass.primitives.awq import scale_search as scale_search
from qpass.primitives.gptq import GptqResult as GptqResult
from qpass.primitives.gptq import HessianAccumulator as HessianAccumulator
from qpass.primitives.gptq import gptq_quantize as gptq_quantize
from qpass.primitives.gptq import reconstruction_error as reconstruction_error
from qpass.primitives.observers import OBSERVERS as OBSERVERS
from qpass.primitives.observers import MinMaxObserver as MinMaxObserver
from qpass.primitives.observers import MovingAverageMinMaxObserver as MovingAverageMinMaxObserver
from qpass.primitives.observers import MseObserver as MseObserver
from qpass.primitives.observers import Observer as Observer
from qpass.primitives.observers import PercentileObserver as PercentileObserver
from qpass.primitives.quant import FP4_E2M1_VALUES as FP4_E2M1_VALUES
from qpass.primitives.quant import FP8_DTYPES as FP8_DTYPES
from qpass.primitives.quant import NF4_VALUES as NF4_VALUES
from qpass.primitives.quant import SCALE_FLOOR as SCALE_FLOOR
from qpass.primitives.quant import block_minmax as block_minmax
from qpass.primitives.quant import choose_qparams as choose_qparams
from qpass.primitives.quant import codes_dtype as codes_dtype
from qpass.primitives.quant import dequantize as dequantize
from qpass.primitives.quant import expand_to as expand_to
from qpass.primitives.quant import fake_quantize as fake_quantize
from qpass.primitives.quant import fake_quantize_dynamic as fake_quantize_dynamic
from qpass.primitives.quant import qparams_from_minmax as qparams_from_minmax
from qpass.primitives.quant import qrange as qrange
from qpass.primitives.quant import quantize as quantize
from qpass.primitives.quant import scale_shape as scale_shape
from qpass.primitives.quant import spec_args as spec_args
from qpass.primitives.spec import FLOAT_MAX as FLOAT_MAX
from qpass.primitives.spec import FloatFormat as FloatFormat
from qpass.primitives.spec import Format as Format
from qpass.primitives.spec import Granularity as Granularity
from qpass.primitives.spec import IntFormat as IntFormat
from qpass.primitives.spec import LutFormat as LutFormat
from qpass.primitives.spec import PerChannel as PerChannel
from qpass.primitives.spec import PerGroup as PerGroup
from qpass.primitives.spec import PerHead as PerHead
from qpass.primitives.spec import PerTensor as PerTensor
from qpass.primitives.spec import PerToken as PerToken
from qpass.primitives.spec import QSpec as QSpec
from qpass.primitives.spec import format_from_name as format_from_name
