"""The fused camera + LiDAR + radar BEV model: encoders, view transforms, decoder, heads, losses, builders.

Import from the submodules (`perception.model.build.build_model`, `perception.model.bevfusion.BEVFusionModel`,
`perception.model.preprocess.Preprocessor`); the BEV pooling shared with the point encoders lives below, in
`fusion.bev_pool`, and the ONNX export above, in `deploy.export`.
"""
