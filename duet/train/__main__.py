import typer

from duet.train.cli import train_command

typer.run(train_command)
