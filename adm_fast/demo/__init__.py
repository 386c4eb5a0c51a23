"""`adm-fast demo`: classifier guidance's fidelity/diversity trade-off on
handwritten digits, with a small ADM and classifiers trained by adm_fast and
shipped in `adm_fast/demo/weights/`.
"""
