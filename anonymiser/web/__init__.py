"""The local web page and HTTP API (``anonymise serve``): standard library only, nothing stored."""
