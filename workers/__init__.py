"""pdserve data plane: engine, block manager, scheduler, model runner, models, KV transfer."""
