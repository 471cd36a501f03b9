"""nuScenes-format data: the synthetic generator, the multi-sensor pipeline, checks."""
