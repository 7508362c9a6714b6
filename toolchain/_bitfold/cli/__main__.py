from bitfold.cli import main

main()
