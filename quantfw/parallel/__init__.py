"""torch.distributed process groups shared by quantize, calibrate, eval and bench."""
