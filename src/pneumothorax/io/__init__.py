"""Format I/O and utilities: paths, config, files, DICOM, RLE, the metric, layouts and manifests."""
