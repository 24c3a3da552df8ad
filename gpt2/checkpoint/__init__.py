"""Checkpoints: saved whole or not at all, found again after any crash, trusted only once checked.

    manager.py         the commit protocol (stage, write, MANIFEST, rename), retention, resume discovery:
                       CheckpointManager, what the training loop and export call
    writer.py          how the files reach the disk: staged on the host, written, hashed, fsynced
                       (in the background for an asynchronous save)
    files.py           what a checkpoint directory holds, its names, and verifying one without a
                       process group
    manifest_check.py  what a MANIFEST.json must look like, and which files verification may open
    safe_load.py       reading checkpoint files without unpickling anything not allowed
    quarantine.py      taking a bad or superseded checkpoint out of the way with a single rename
    lease.py           one writer per run directory
    interval.py        how often to save: fixed, or the Young/Daly interval (`interval: auto`)

Nothing is re-exported here: import from the module that defines a name.
"""
