"""The MODEL_DIR format's name and version (shared by the model and its reader/writer)."""

FORMAT = "polymap.PhaseModel"
FORMAT_VERSION = 1
