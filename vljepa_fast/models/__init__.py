"""The VL-JEPA model assembled from the fused modules."""
