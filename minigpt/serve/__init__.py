"""The chat and serving layer: conversation framing, reply streaming, panels, sessions, handlers."""
