"""milepost.engine."""
