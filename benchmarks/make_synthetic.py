"""Generate a synthetic sequential dataset in RecBole's atomic format (never committed: run it).

    python -m benchmarks.make_synthetic --items=100000 --users=20000 --per_user=20 --out=synthetic

Writes <out>/<name>/<name>.inter (user_id, item_id, timestamp), <name> defaulting to
synth-<items>. Item popularity follows a Zipf law and each user drifts through the catalogue
(the next item is often close to the previous one), so sequences carry a learnable signal.
"""

import argparse
import os

import numpy as np


def generate(items, users, per_user, seed=0):
    """Rows (user, item, t) with 1-based ids; every item id in 1..items can occur."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(3, per_user // 2), per_user * 3 // 2 + 1, size=users)
    user_ids = np.repeat(np.arange(1, users + 1), lengths)
    positions = np.concatenate([np.arange(n) for n in lengths])
    first = np.cumsum(lengths) - lengths  # index of each user's first interaction
    popular = (rng.zipf(1.2, size=len(user_ids)) - 1) % items
    steps = rng.integers(-20, 21, size=len(user_ids))  # a random walk near the previous item
    steps[first] = 0
    walked = np.cumsum(steps)
    walk = np.repeat(rng.integers(0, items, size=users), lengths) + walked - np.repeat(walked[first], lengths)
    item_ids = np.where(rng.random(len(user_ids)) < 0.3, popular, walk % items) + 1
    return user_ids, item_ids, positions


def write(folder, name, user_ids, item_ids, positions):
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    path = os.path.join(folder, name, f"{name}.inter")
    with open(path, "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        np.savetxt(f, np.stack([user_ids, item_ids, positions], axis=1), fmt="%d", delimiter="\t")
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--per_user", type=int, default=20, help="mean interactions per user")
    parser.add_argument("--out", default="synthetic")
    parser.add_argument("--name", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    name = args.name or f"synth-{args.items}"
    path = write(args.out, name, *generate(args.items, args.users, args.per_user, args.seed))
    print(path)


if __name__ == "__main__":
    main()
