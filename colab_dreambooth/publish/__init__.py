"""After training: model cards and releases (export, samples, upload)."""
