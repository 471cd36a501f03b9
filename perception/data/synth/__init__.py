"""A synthetic world rendered into the exact nuScenes v1.0 on-disk format (cameras, LiDAR, radar, maps)."""
