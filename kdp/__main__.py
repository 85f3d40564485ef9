from kdp.cli import console

console()
