"""`evaluate` module: image-level ROC-AUC and F1-max for anomaly detection (works offline; load it by path).

```python
>>> import evaluate
>>> from maeday_hf.metrics import METRIC_PATHS
>>> metric = evaluate.load(METRIC_PATHS["image_anomaly"])
>>> metric.compute(predictions=[0.1, 0.9, 0.4], references=[0, 1, 0])
{'image_roc_auc': 1.0, 'image_f1_max': 1.0}
```
"""

from __future__ import annotations

import datasets
import evaluate

from maeday_hf.metrics.image import image_f1_max, image_roc_auc

_DESCRIPTION = "Image-level ROC-AUC and F1-max of anomaly scores against good (0) / anomaly (1) labels."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[float]`): one anomaly score per image (`pred_score`), higher is more anomalous.
    references (`list[int]`): 0 for a good image, 1 for an anomalous one (`gt_label`).
Returns:
    image_roc_auc (`float`): area under the ROC curve, equal to `sklearn.metrics.roc_auc_score`.
    image_f1_max (`float`): largest F1 over all thresholds.
"""

_CITATION = """\
@inproceedings{bergmann2019mvtec,
  title={MVTec AD -- A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection},
  author={Bergmann, Paul and Fauser, Michael and Sattlegger, David and Steger, Carsten},
  booktitle={CVPR},
  year={2019}
}
"""


class ImageAnomaly(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                # references as float64: an int32 feature would truncate a label of 0.7 to 0 before the metric's own
                # check (labels 0 or 1) could refuse it.
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        return {
            "image_roc_auc": image_roc_auc(references, predictions),
            "image_f1_max": image_f1_max(references, predictions),
        }
