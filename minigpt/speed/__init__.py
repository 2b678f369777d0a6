"""How a loaded model is made fast, chosen once at load time (see inference.load_for_inference).

- onednn.py: float32 Linears on CPU multiply through oneDNN; weights kept in (in, out) memory order.
- quantize.py: int8 weight-only quantization (module swap, as gpt-fast does).
- native.py + decode_step.c: one float32 or int8 decode step per C call.
- decoder.py: the seam generation calls: prompts through PyTorch, single tokens through the
  fastest step built for the model.
"""
