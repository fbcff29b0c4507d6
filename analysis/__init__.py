"""Turn experiment directories into tables, curves and figures; needs files on disk only, no Ray cluster."""
