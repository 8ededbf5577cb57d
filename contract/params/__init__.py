"""Request schemas of the job kinds; each module that declares a `SPEC` is a registered method."""
