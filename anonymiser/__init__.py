"""The image core: decode, locate heads, cover, encode. Knows nothing of networks or platforms."""

import os

# ONNX Runtime (1.2x+) records Microsoft "1DS" telemetry on Linux: a device id and a queue of
# events (Python path, OS, CPU...) in ~/.cache/Microsoft/DeveloperTools/.onnxruntime/ and a
# session file in $TMPDIR, meant to be uploaded. A tool for people at risk must neither write
# those files nor try to send them. The switch is read when onnxruntime is first imported, which
# always happens after this package is imported; forced on, not a default that can be undone.
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
