from lmforge.cli import app

app(prog_name="lmforge")
