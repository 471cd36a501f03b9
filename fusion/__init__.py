"""LiDAR and radar point encoders into the BEV grid, and the multi-sensor BEV fuser."""
