"""milepost.daemon."""
