from deit_train.search.report import main

if __name__ == "__main__":
    main()
