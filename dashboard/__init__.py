"""milepost.dashboard."""
