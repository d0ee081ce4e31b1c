"""`evaluate` module: pixel-level ROC-AUC, F1-max and AUPRO for anomaly localisation (works offline; load it by path).

```python
>>> import evaluate, numpy as np
>>> from maeday_hf.metrics import METRIC_PATHS
>>> metric = evaluate.load(METRIC_PATHS["pixel_anomaly"])
>>> mask = np.pad(np.ones((2, 2), dtype=np.uint8), 3)
>>> metric.compute(predictions=[mask * 0.9], references=[mask])["pixel_roc_auc"]
1.0
```

Each prediction is one `(height, width)` anomaly map, each reference the binary mask of the same size (all zeros for a
good image). `evaluate` keeps every added map until `compute()`; for a whole category without that copy, call
`maeday_hf.metrics.compute_pixel_metrics` on the maps directly (streamed, bounded memory).
"""

from __future__ import annotations

import datasets
import evaluate

from maeday_hf.metrics.pixel import DEFAULT_MAX_FPR, DEFAULT_NUM_BINS, compute_pixel_metrics

_DESCRIPTION = "Pixel-level ROC-AUC, F1-max and AUPRO (MVTec AD protocol, FPR up to 0.3) of anomaly maps against masks."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `(height, width)` float arrays): anomaly maps (`anomaly_map`), at the masks' size.
    references (`list` of `(height, width)` arrays of 0 to 65535): ground-truth masks (`gt_mask`, bool, 8- or
        16-bit), non-zero is anomalous.
    max_fpr (`float`, defaults to 0.3): AUPRO integration limit; the area is divided by it.
    num_bins (`int` or `None`, defaults to 65536): histogram bins; `None` sorts all pixels for exact values.
    connectivity (`int`, defaults to 8): neighbourhood of the ground-truth regions for AUPRO.
Returns:
    pixel_roc_auc, pixel_f1_max, aupro (`float`), and for each `<name>_error_bound` (`float`, 0 when exact).
"""

_CITATION = """\
@article{bergmann2021mvtec,
  title={The MVTec Anomaly Detection Dataset: A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection},
  author={Bergmann, Paul and Batzner, Kilian and Fauser, Michael and Sattlegger, David and Steger, Carsten},
  journal={International Journal of Computer Vision},
  year={2021}
}
"""


class PixelAnomaly(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    # float64: a float64 map is kept as it is (float32 would merge close values: num_bins=None
                    # would no longer be exact); a float32 map converts without loss.
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float64"))),
                    # uint16: 8- and 16-bit masks alike (a 16-bit mask's 256 or 65535 does not fit uint8).
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                }
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        max_fpr: float = DEFAULT_MAX_FPR,
        num_bins: int | None = DEFAULT_NUM_BINS,
        connectivity: int = 8,
    ) -> dict[str, float]:
        result = compute_pixel_metrics(
            references, predictions, max_fpr=max_fpr, num_bins=num_bins, connectivity=connectivity
        )
        return dict(vars(result))
