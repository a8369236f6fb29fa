"""pdserve control plane: config, router, prefix index, servers, CLI."""
