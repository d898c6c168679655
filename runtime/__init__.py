"""lockstep's Python runtime: config, loaders, tokenizer, model, KV cache, scheduler, engine, sampler, CLI."""
import os

# gRPC installs fork handlers that pause and resume its own threads around every fork(); when
# another thread is inside gRPC at that moment the handlers lose the race and a gRPC thread can
# crash later (grpc/grpc#31885). lockstep only ever forks to exec (pip, a benchmark's child
# process), never to carry a channel into a child, which is the case gRPC documents turning the
# handlers off for. It must be set before grpc is imported, so it is set here; a user's own
# setting wins.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
