"""Embedded real-image data sources (unimed-mini) and their task wording."""
