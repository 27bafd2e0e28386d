"""Testing helpers for headq and its plugins: the method conformance kit.

A plugin's test suite can check its methods with::

    from headq_core.testing import check_key_quantizer, check_value_policy

    def test_my_method_conforms():
        check_key_quantizer("mymethod:bits=2")
        check_value_policy("mymethod:bits=2")
"""

from __future__ import annotations

from headq_core.testing.calibration import synthetic_calibration, synthetic_stats
from headq_core.testing.conformance import check_key_quantizer, check_value_policy
from headq_core.testing.driving import feed, held_bytes, model_config, outlier_data, snr_db, snr_floor_db

__all__ = [
    "check_key_quantizer",
    "check_value_policy",
    "feed",
    "held_bytes",
    "model_config",
    "outlier_data",
    "snr_db",
    "snr_floor_db",
    "synthetic_calibration",
    "synthetic_stats",
]
