"""milepost.alerts."""
