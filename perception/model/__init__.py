"""The fused camera + LiDAR + radar BEV model: encoders, view transforms, decoder, heads, losses, builders.

Import from the submodules (`perception.model.build.build_model`, `perception.model.bevfusion.BEVFusionModel`,
`perception.model.export.export_core_onnx`);
this package file stays empty so that `fusion.*` can import `perception.model.bev_pool` without cycles.
"""
