"""Run DeepMind's ``mathematics_dataset`` generator (read out of its pinned wheel).

Invoked by :mod:`data_prep.mathgen` as a subprocess (the generator keeps global
absl flags and global random state):

    python mathgen_worker.py PACKAGE_DIR SIX_DIR REGIME PER_MODULE SEED OUT.jsonl [MODULE_PREFIX]

The 2019 code needs three shims on current numpy (2.x) and sympy (1.14); the
package itself is not modified on disk:
- ``np.object`` was removed in numpy 1.24: alias it to ``object``;
- ``ndarray.itemset`` was removed in numpy 2: ``sample/polynomials.py`` is
  compiled with ``X.itemset(i, v)`` rewritten to ``X[i] = v`` (same semantics,
  also for object arrays);
- ``sympy.solvers.diophantine.base_solution_linear`` moved to the
  ``diophantine.diophantine`` submodule: re-export it.
Every module is seeded from (seed, module name), so outputs do not depend on
which other modules run.  Two more sources of randomness make the same seed give other problems in
another process, so they are pinned too (measured: 30 of 280 rows differed between two runs):
- sympy draws from its own generator (``sympy.core.random``; ``randprime`` in the prime modules), which
  ``random.seed`` does not reach: seeded with the module;
- ``composition.expand_entities`` shuffles a list made from a *set* of ``Entity`` objects, which hash by
  memory address, so the shuffle starts from an address-dependent order: ``Entity`` gets a hash from a
  per-module creation counter, which fixes the set's order and leaves identity equality as it is.
"""
from __future__ import annotations

import importlib.abc
import itertools
import importlib.util
import json
import random
import re
import sys
import zlib


class _PolynomialsShim(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    name = "mathematics_dataset.sample.polynomials"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        sys.meta_path.insert(0, self)
        self.origin = spec.origin
        return importlib.util.spec_from_loader(fullname, self, origin=spec.origin)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        source = open(self.origin, encoding="utf-8").read()
        source, n = re.subn(r"(\w+)\.itemset\(([^,()]+), ([^()]+)\)", r"\1[\2] = \3", source)
        assert n == 2, f"expected 2 itemset calls in {self.origin}, found {n}"
        module.__file__ = self.origin
        exec(compile(source, self.origin, "exec"), module.__dict__)


def main(argv: list[str]) -> None:
    package_dir, six_dir, regime, per_module, seed, out, only = (argv + [""])[:7]
    sys.path[:0] = [package_dir, six_dir]
    import importlib

    import numpy as np

    dio_pkg = importlib.import_module("sympy.solvers.diophantine")
    dio_mod = importlib.import_module("sympy.solvers.diophantine.diophantine")

    np.object = object  # type: ignore[attr-defined]
    dio_pkg.base_solution_linear = dio_mod.base_solution_linear
    sys.meta_path.insert(0, _PolynomialsShim())

    from absl import flags
    from mathematics_dataset import generate
    from mathematics_dataset.util import composition
    from sympy.core import random as sympy_random

    serial = {"next": itertools.count()}
    entity_init = composition.Entity.__init__

    def init(self, *args, **kwargs):
        self._serial = next(serial["next"])
        entity_init(self, *args, **kwargs)

    composition.Entity.__init__ = init
    composition.Entity.__hash__ = lambda self: self._serial

    flags.FLAGS(["mathgen", f"--per_train_module={per_module}", f"--per_test_module={per_module}"])
    generate.init_modules(train_split=False)
    modules = generate.filtered_modules[regime]
    with open(out, "w", encoding="utf-8") as f:
        for name, module in modules.items():
            if only and not name.startswith(only):
                continue
            module_seed = (int(seed) * 1_000_003 + zlib.crc32(f"{regime}/{name}".encode())) % 2**32
            random.seed(module_seed)
            np.random.seed(module_seed)
            sympy_random.seed(module_seed)
            serial["next"] = itertools.count()
            for _ in range(int(per_module)):
                problem, _ = generate.sample_from_module(module)
                row = {"question": str(problem.question), "answer": str(problem.answer), "module": name}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
