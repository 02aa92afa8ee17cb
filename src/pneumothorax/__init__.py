"""pneumothorax: a SIIM-ACR pneumothorax segmentation pipeline.

Stages live in short-noun modules (``dicom``, ``rle``, ``metric``, ``folds``, ``data``,
``models``, ``train``, ``classifier``, ``infer``, ``thresholds``, ``submission``,
``synthetic``); nothing runs at import.
"""

__version__ = "0.1.0"
