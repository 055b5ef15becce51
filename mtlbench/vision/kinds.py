"""Dense task kinds and their metrics, torch-free (the leaderboard reads them without importing torch)."""
DENSE_KINDS = ("segmentation", "depth", "normals", "binary_map")
DENSE_METRICS = {
    "segmentation": ("miou", "pixel_acc"),
    "depth": ("abs_err", "rel_err", "delta1"),
    "normals": ("mean_angle", "median_angle", "within_11_25", "within_22_5", "within_30"),
    "binary_map": ("best_f", "iou"),
}
DENSE_METRIC_NAMES = frozenset(m for ms in DENSE_METRICS.values() for m in ms)
DENSE_DIRECTIONS = {"miou": "max", "pixel_acc": "max", "abs_err": "min", "rel_err": "min", "delta1": "max",
                    "mean_angle": "min", "median_angle": "min", "within_11_25": "max", "within_22_5": "max",
                    "within_30": "max", "best_f": "max", "iou": "max"}
