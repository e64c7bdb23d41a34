"""What a benchmark ran on: machine, library versions and thread counts, as markdown lines."""

import os
import platform


def describe() -> str:
    import numpy as np

    import xpnet

    lines = [
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU(s), {platform.platform()}",
        f"- Python {platform.python_version()}, xpnet {xpnet.__version__}, NumPy {np.__version__}",
    ]
    try:
        from threadpoolctl import threadpool_info

        pools = [f"{p['internal_api']} {p['num_threads']} thread(s)" for p in threadpool_info()]
        lines.append(f"- BLAS: {', '.join(pools)}")
    except ImportError:
        config = np.show_config(mode="dicts") if hasattr(np, "show_config") else {}
        blas = config.get("Build Dependencies", {}).get("blas", {}).get("name", "unknown")
        lines.append(f"- BLAS: {blas}")
    from xpnet import _fast

    lines.append(f"- xpnet's BLAS fast path (gemm with beta = 1): {_fast.library() or 'none'}")
    try:
        import torch

        lines.append(f"- torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s)")
    except ImportError:
        pass
    return "\n".join(lines)
