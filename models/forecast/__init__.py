"""Forecasting on the device: TFLite LSTM, numpy fallback, conformal intervals, exhaustion ETAs.

Inference code here imports only numpy and the TFLite interpreter; training
lives in ``models.training.lstm``. The daemon talks to ``ForecastEngine``.
"""
from models.forecast.conformal import ConformalCalibrator, ConformalParams
from models.forecast.engine import DEFAULT_METRICS, ForecastEngine, ForecastParams
from models.forecast.exhaustion import DEFAULT_LIMITS, ExhaustionParams, exhaustion_eta, parse_limits
from models.forecast.fallback import FallbackParams, fit_fallback
from models.forecast.lstm import InvalidModel, LSTMForecaster
from models.forecast.selector import ModelSelector, SelectorParams

__all__ = [
    "ConformalCalibrator", "ConformalParams", "DEFAULT_LIMITS", "DEFAULT_METRICS", "ExhaustionParams",
    "FallbackParams", "ForecastEngine", "ForecastParams", "InvalidModel", "LSTMForecaster", "ModelSelector",
    "SelectorParams", "exhaustion_eta", "fit_fallback", "parse_limits",
]
