from recbole_t2diff.model.t2diff import T2Diff

__all__ = ["T2Diff"]
