"""pneumothorax: a SIIM-ACR pneumothorax segmentation pipeline.

One folder per layer, imports pointing down only: ``io`` (paths, config, files, DICOM, RLE, the metric,
layouts) -> ``data`` (prepare, folds, datasets) -> ``models`` -> ``train`` (the Trainer and its tasks) ->
``predict`` -> ``post`` (the post-processing decision, its search, the submission) -> ``pipeline`` (steps
over experiment folders, freshness for Make). Nothing runs at import.
"""

__version__ = "0.1.0"
